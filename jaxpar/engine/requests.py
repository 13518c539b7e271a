"""Requests as the engine sees them, their results, and handles for streaming."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

from jaxpar.sampling import SamplingParams
from jaxpar.stopping import SequenceOutput


@dataclasses.dataclass
class Request:
    """One request's bookkeeping, from arrival to its last token."""

    index: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    ignore_eos: bool
    output: SequenceOutput
    arrival: float  # time.perf_counter() when it may start (its arrival in a trace)
    prefill_start: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    prefilled: int = 0  # prompt tokens already sent to prefill
    prefill_row: int | None = None
    slot: int | None = None
    first: tuple | None = None  # (device array, row) holding the first token, until read
    first_before_step: int = 0  # decode steps dispatched before its last prefill chunk
    deltas: list = dataclasses.field(default_factory=list)  # (token ids, text) not yet streamed
    token_times: list = dataclasses.field(default_factory=list)  # when each token reached the host
    stream_callback: object = None
    message: int | None = None  # two-process prefill: the index of its payload message
    first_token: int | None = None  # two-process prefill: the first token, once read
    remote: dict | None = None  # two-process decode: the prefill process's note

    @property
    def done(self) -> bool:
        return self.output.done

    def ints(self) -> list[int]:
        """The integer settings a slot needs: [max_new, top_k, seed]."""
        return [self.max_new_tokens, self.sampling.top_k, self.sampling.seed]

    def stop_row(self, width: int) -> list[int]:
        """The ids that end this request (the model's unless ignore_eos, and its own), padded."""
        ids = sorted(self.output.stop_ids)
        return ids + [-1] * (width - len(ids))

    def floats(self) -> list[float]:
        return [self.sampling.temperature, self.sampling.top_p]

    def add_token(self, token: int, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        delta = self.output.add(token)
        self.deltas.append(([int(token)], delta))
        if self.stream_callback is not None and delta:
            self.stream_callback(self.index, delta)
        if self.output.done:
            self.finish_time = now

    def result(self) -> "RequestOutput":
        out = self.output
        n = len(out.token_ids)
        ttft = (self.first_token_time - self.arrival) * 1e3
        tpot = ((self.finish_time - self.first_token_time) * 1e3 / (n - 1)) if n > 1 else 0.0
        return RequestOutput(index=self.index, text=out.final_text(), token_ids=list(out.token_ids),
                             prompt_token_ids=list(self.prompt), finish_reason=out.finish_reason,
                             ttft_ms=ttft, tpot_ms=tpot,
                             queued_ms=(self.prefill_start - self.arrival) * 1e3,
                             latency_ms=(self.finish_time - self.arrival) * 1e3,
                             token_times_ms=[(t - self.arrival) * 1e3 for t in self.token_times])


@dataclasses.dataclass
class RequestOutput:
    """One request's result: what `GenerationResult` holds per row, plus its timings.

    ttft_ms: arrival to first token on the host; tpot_ms: mean time per output token
    after the first; queued_ms: arrival to the start of its prefill; token_times_ms: when
    each token reached the host, from arrival (their gaps are the inter-token latencies).
    """

    index: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    ttft_ms: float
    tpot_ms: float
    queued_ms: float
    latency_ms: float
    token_times_ms: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EngineResult:
    """The results of `Engine.generate`, in request order: `results[i]` is request i's
    `RequestOutput`; `texts`, `token_ids`, `prompt_token_ids` and `finish_reasons` read
    like `GenerationResult`'s."""

    outputs: list[RequestOutput]
    wall_ms: float  # from the call to the last token
    decode_steps: int

    def __getitem__(self, i: int) -> RequestOutput:
        return self.outputs[i]

    def __len__(self) -> int:
        return len(self.outputs)

    def __iter__(self) -> Iterator[RequestOutput]:
        return iter(self.outputs)

    @property
    def texts(self) -> list[str]:
        return [o.text for o in self.outputs]

    @property
    def token_ids(self) -> list[list[int]]:
        return [o.token_ids for o in self.outputs]

    @property
    def prompt_token_ids(self) -> list[list[int]]:
        return [o.prompt_token_ids for o in self.outputs]

    @property
    def finish_reasons(self) -> list[str]:
        return [o.finish_reason for o in self.outputs]

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time, prefill included."""
        n = sum(len(o.token_ids) for o in self.outputs)
        return n / (self.wall_ms / 1e3) if self.wall_ms > 0 else float("nan")


@dataclasses.dataclass
class StreamDelta:
    token_ids: list[int]
    text: str


class RequestHandle:
    """A submitted request. Iterating it runs the engine and yields `StreamDelta`s as the
    request's tokens arrive; `result()` runs the engine until the request is done."""

    def __init__(self, step: Callable[[], None], request: Request):
        self._step = step  # one round of the engine that owns the request
        self._request = request

    @property
    def index(self) -> int:
        return self._request.index

    @property
    def done(self) -> bool:
        return self._request.done

    def __iter__(self) -> Iterator[StreamDelta]:
        req = self._request
        while True:
            while req.deltas:
                ids, text = req.deltas.pop(0)
                yield StreamDelta(ids, text)
            if req.done:
                return
            self._step()

    def result(self) -> RequestOutput:
        while not self._request.done:
            self._step()
        self._request.deltas.clear()
        return self._request.result()


def now() -> float:
    return time.perf_counter()
