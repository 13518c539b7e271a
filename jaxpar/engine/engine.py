"""`Engine`: continuous batching over fixed decode slots, chunked prefill, and prefill /
decode disaggregation across device sets or processes.

The engine takes a loaded model (anything with `module`, `dtype`, `tokenizer`,
`stop_ids`, like `jaxpar.LoadedModel`) or a path together with a `load` function (the
public `jaxpar.Engine` passes `jaxpar.load`). Each stage (prefill, decode) has a policy and
devices; a stage left unset shares the other's.
"""

from __future__ import annotations

import math
from os import PathLike
from typing import Callable, Sequence

import jax
import numpy as np

from jaxpar.assembly import make_sharding
from jaxpar.engine.errors import EngineError
from jaxpar.engine.placement import Stage, bytes_per_device, place
from jaxpar.engine.programs import DecodePrograms, PrefillPrograms
from jaxpar.engine.requests import EngineResult, Request, RequestHandle, now
from jaxpar.engine.scheduler import Scheduler
from jaxpar.engine.requests import RequestOutput
from jaxpar.engine.transfer import (Channel, LocalLink, ReceiveLink, SendLink, handshake, kv_reorders,
                                    mirror_mesh, payload_shapes, payload_shardings)
from jaxpar.engine.workers import DecodeWorker, PrefillWorker
from jaxpar.models.cache import CacheDtypes
from jaxpar.models.decoder import cache_shapes
from jaxpar.sampling import SamplingParams
from jaxpar.sharding.model_sharding import ModelSharding
from jaxpar.stopping import SequenceOutput
from jaxpar.tokenizer import Prompt, encode

MAX_STOP_TOKEN_IDS = 8  # per request, beside the model's own stop ids


def _whole(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EngineError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _role(prefill_devices, decode_devices) -> str:
    """'local' (both stages in this process), 'prefill' or 'decode' (this process runs
    that stage of a two-process engine)."""
    me = jax.process_index()

    def owner(devices, name):
        procs = {d.process_index for d in devices}
        if len(procs) > 1:
            raise EngineError(f"the {name} devices span processes {sorted(procs)}: each stage must run "
                              "within one process (prefill in one, decode in another)")
        return procs.pop()

    p, d = owner(prefill_devices, "prefill"), owner(decode_devices, "decode")
    if p == d == me:
        return "local"
    if p == me:
        return "prefill"
    if d == me:
        return "decode"
    raise EngineError(f"this process ({me}) holds neither the prefill devices (process {p}) nor the "
                      f"decode devices (process {d})")


def _is_path(model) -> bool:
    return isinstance(model, (str, PathLike))


class Engine:
    """A serving engine: requests are prefilled in chunks, moved into a free decode slot,
    and decoded together with whatever else is running; a finished request frees its
    slot for the next one at once.

    `max_slots` decode slots of `max_len` tokens each are allocated once in the decode
    policy's shardings. `prefill_chunk` is the most prompt tokens one prefill step takes
    per request (shorter chunks use power-of-two buckets, so no request compiles anything
    new). `prefill_batch` requests are prefilled side by side (default: the prefill
    policy's batch split, at least 1). `kv_cache_dtype` / `state_dtype` (as in
    `jaxpar.load`) choose the cache's dtypes; None keeps the loaded model's.

    Prefill / decode disaggregation: give `prefill_policy` / `prefill_devices` different
    from the decode ones (e.g. prefill `{"axes": {"tp": 4}}` on devices 0-3, decode TPA1 +
    DCP4 on devices 4-7); each request's cache is resharded from the prefill to the decode
    layout as it moves. Under `jax.distributed`, prefill devices of one process and decode
    devices of another make a two-process engine: call `generate` with the same arguments
    in both processes.
    """

    _two_process_engines = 0  # names each two-process engine's messages

    def __init__(self, model, *, dtype=None, max_slots: int = 8, max_len: int = 1024,
                 prefill_policy=None, prefill_devices: Sequence[jax.Device] | None = None,
                 decode_policy=None, decode_devices: Sequence[jax.Device] | None = None,
                 prefill_chunk: int = 256, prefill_batch: int | None = None,
                 kv_cache_dtype: str | None = None, state_dtype: str | None = None,
                 load: Callable | None = None):
        max_slots = _whole("max_slots", max_slots)
        max_len = _whole("max_len", max_len)
        prefill_chunk = _whole("prefill_chunk", prefill_chunk)
        if prefill_batch is not None:
            prefill_batch = _whole("prefill_batch", prefill_batch)
        loaded = None if _is_path(model) else model
        if loaded is None and load is None:
            raise EngineError("jaxpar.engine.Engine takes a loaded model; to start from a path use "
                              "jaxpar.Engine (or pass load=jaxpar.load)")
        if loaded is not None and not hasattr(loaded, "module"):
            raise EngineError(f"expected a loaded model (jaxpar.load(...)) or a path, got {type(model).__name__}")

        # Devices of each stage (a stage left unset shares the other's).
        if decode_devices is not None:
            decode_devices = list(decode_devices)
        elif loaded is not None and decode_policy is None:
            decode_devices = list(loaded.sharding.mesh.devices.flat)
        else:
            decode_devices = jax.devices() if decode_policy is not None else jax.devices()[:1]
        same_stage = prefill_policy is None and prefill_devices is None
        prefill_devices = list(prefill_devices) if prefill_devices is not None else decode_devices
        for name, devs in (("decode_devices", decode_devices), ("prefill_devices", prefill_devices)):
            if not devs:
                raise EngineError(f"{name} is empty")
        self.role = _role(prefill_devices, decode_devices)

        # The model, loaded (or placed) on the stage(s) this process runs.
        loaded_stage = None  # the stage a path was loaded for (its sharding is that stage's)
        if loaded is None:
            loaded_stage = "prefill" if self.role == "prefill" else "decode"
            policy, devices = ((prefill_policy, prefill_devices) if loaded_stage == "prefill"
                               else (decode_policy, decode_devices))
            kwargs = {} if dtype is None else {"dtype": dtype}
            kwargs.update({k: v for k, v in (("kv_cache_dtype", kv_cache_dtype), ("state_dtype", state_dtype))
                           if v is not None})
            loaded = load(model, policy=policy, devices=devices, progress=False, **kwargs)
        elif dtype is not None and np.dtype(dtype) != np.dtype(loaded.dtype):
            raise EngineError(f"the model was loaded as {np.dtype(loaded.dtype).name}, but dtype={dtype!r} "
                              "was asked for: load it with that dtype")
        self.cfg = cfg = loaded.module.cfg
        self.dtype = loaded.dtype
        # The cache's dtypes: the loaded model's, unless this engine asks for others (the
        # weights do not depend on them).
        own_dtypes = getattr(loaded, "cache_dtypes", None) or CacheDtypes.resolve(loaded.dtype)
        self.cache_dtypes = CacheDtypes.resolve(
            loaded.dtype, own_dtypes.kv if kv_cache_dtype is None else kv_cache_dtype,
            own_dtypes.state if state_dtype is None else state_dtype)
        self.tokenizer = loaded.tokenizer
        self.stop_ids = frozenset(int(i) for i in loaded.stop_ids)
        own = loaded.module.sharding

        def sharding_for(stage: str, policy, devices) -> ModelSharding:
            """The loaded model's own sharding when it fits the stage, else the stage's."""
            if stage == loaded_stage or (policy is None and list(own.mesh.devices.flat) == list(devices)):
                return own
            try:
                return make_sharding(cfg, policy, devices=devices)
            except ValueError as e:
                raise EngineError(f"the {stage} policy does not fit {cfg.model_type} on "
                                  f"{len(devices)} devices: {e}") from e

        decode_sharding = sharding_for("decode", decode_policy, decode_devices)
        prefill_sharding = decode_sharding if same_stage else sharding_for("prefill", prefill_policy, prefill_devices)

        # Shapes: slots split over attention-DP ranks, lengths over DCP / SP ranks.
        if max_len > cfg.max_position_embeddings:
            raise EngineError(f"max_len={max_len} exceeds the model's context of {cfg.max_position_embeddings} tokens")
        split = decode_sharding.batch_multiple
        if max_slots % split:
            raise EngineError(f"the decode policy ({decode_sharding.table_name}) splits the decode batch {split} "
                              f"ways (attention data parallelism), so it cannot hold {max_slots} slots: "
                              f"max_slots must be a multiple of {split}")
        p_split = prefill_sharding.batch_multiple
        rows = prefill_batch if prefill_batch is not None else p_split
        if rows % p_split:
            raise EngineError(f"the prefill policy ({prefill_sharding.table_name}) splits batches {p_split} ways: "
                              f"prefill_batch must be a multiple of {p_split}, got {prefill_batch}")
        self.max_slots, self.max_len, self.prefill_rows = max_slots, max_len, rows
        self.prefill_chunk = prefill_chunk
        multiple = math.lcm(decode_sharding.seq_multiple, prefill_sharding.seq_multiple)
        self.cache_len = -(-max_len // multiple) * multiple
        self.decode_sharding, self.prefill_sharding = decode_sharding, prefill_sharding

        # Stages and programs for what this process runs.
        attention = [kind == "attention" for kind in cfg.layer_types]
        reorders = kv_reorders(prefill_sharding, decode_sharding, attention, self.cache_len)
        decode_shapes = cache_shapes(cfg, decode_sharding, max_slots, self.cache_len, self.cache_dtypes)
        decode_mesh = decode_sharding.mesh
        self.decode_stage = self.prefill_stage = None
        if self.role in ("local", "decode"):
            _check_memory(decode_shapes, decode_sharding, max_slots, self.cache_len)
            self.decode_stage = Stage(place(loaded.module, decode_sharding, self.dtype), self.dtype,
                                      self.cache_dtypes)
        if self.role in ("local", "prefill"):
            if prefill_sharding is decode_sharding and self.decode_stage is not None:
                self.prefill_stage = self.decode_stage
            else:
                self.prefill_stage = Stage(place(loaded.module, prefill_sharding, self.dtype), self.dtype,
                                           self.cache_dtypes)

        self._channel = None
        self._calls = 0
        if self.role == "local":
            link = LocalLink(payload_shardings(decode_shapes, decode_mesh))
            out_shardings = None
        else:
            # Both processes build their two-process engines in the same order.
            Engine._two_process_engines += 1
            self._channel = Channel(f"jaxpar/engine/{Engine._two_process_engines}")
            mirror = mirror_mesh(decode_mesh, prefill_devices)
            source = payload_shardings(decode_shapes, mirror)
            target = payload_shardings(decode_shapes, decode_mesh)
            if self.role == "prefill":
                link, out_shardings = SendLink(target, self._channel), source
            else:
                link = ReceiveLink(source, payload_shapes(decode_shapes), target, self._channel)
                out_shardings = None
            handshake(self.role == "prefill", mirror, decode_mesh, self._channel)

        prefill = decode = None
        if self.prefill_stage is not None:
            programs = PrefillPrograms(self.prefill_stage, reorders, out_shardings)
            prefill = PrefillWorker(self.prefill_stage, programs, rows, self.cache_len, prefill_chunk)
        if self.decode_stage is not None:
            decode = DecodeWorker(self.decode_stage, DecodePrograms(self.decode_stage, decode_shapes),
                                  max_slots, self.cache_len, len(self.stop_ids) + MAX_STOP_TOKEN_IDS)
        shared_devices = set(prefill_devices) & set(decode_devices)
        self._scheduler = Scheduler(prefill, decode, link,
                                    stage_limit=rows if shared_devices else max_slots,
                                    shared_devices=bool(shared_devices))
        self._next_index = 0

    # ------------------------------------------------------------------ requests

    @property
    def mode(self) -> str:
        """'colocated', 'disaggregated' (one process) or 'prefill' / 'decode' (this
        process's part of a two-process engine)."""
        if self.role != "local":
            return self.role
        return "colocated" if self._scheduler.shared_devices else "disaggregated"

    def _encode(self, prompt: Prompt, chat: bool) -> list[int]:
        if self.tokenizer is None and not (isinstance(prompt, (list, tuple)) and
                                           all(isinstance(t, (int, np.integer)) for t in prompt)):
            raise EngineError("this model was loaded without a tokenizer: pass token ids")
        return [int(t) for t in encode(self.tokenizer, prompt, chat=chat)]

    def _detokenize(self):
        if self.tokenizer is None:
            return None
        return lambda toks: self.tokenizer.decode(toks, skip_special_tokens=True)

    def _request(self, ids: list[int], position: int, max_new_tokens: int, sampling: SamplingParams,
                 stop: Sequence[str], stop_token_ids: Sequence[int], ignore_eos: bool, arrival: float,
                 track_text: bool) -> Request:
        where = f"request {position}"
        if not ids:
            raise EngineError(f"{where}: the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise EngineError(f"{where}: token id(s) {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(ids) > self.max_len:
            raise EngineError(f"{where}: the prompt has {len(ids)} tokens, longer than max_len={self.max_len}")
        if len(ids) + max_new_tokens > self.max_len:
            raise EngineError(f"{where}: prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                              f"exceeds max_len={self.max_len}")
        if (stop or track_text) and self.tokenizer is None:
            raise EngineError("stop strings and streamed text need a tokenizer")
        stop_ids = set(stop_token_ids) | (set() if ignore_eos else set(self.stop_ids))
        output = SequenceOutput(max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                stop_strings=stop, detokenize=self._detokenize(), track_text=track_text)
        return Request(index=-1, prompt=ids, max_new_tokens=max_new_tokens, sampling=sampling,
                       ignore_eos=ignore_eos, output=output, arrival=arrival)

    def _prepare(self, prompts, max_new_tokens, *, temperature, top_k, top_p, seed, stop, stop_token_ids,
                 chat, ignore_eos, arrival_times, track_text) -> list[Request]:
        """Checks every request before any is queued (nothing half-submitted on error)."""
        n = len(prompts)
        if n == 0:
            raise EngineError("no prompts given")
        if isinstance(max_new_tokens, (list, tuple, np.ndarray)):
            if len(max_new_tokens) != n:
                raise EngineError(f"max_new_tokens has {len(max_new_tokens)} entries for {n} prompts")
            budgets = [_whole(f"max_new_tokens[{i}]", m) for i, m in enumerate(max_new_tokens)]
        else:
            budgets = [_whole("max_new_tokens", max_new_tokens)] * n
        if arrival_times is not None:
            if len(arrival_times) != n or any(not (a >= 0) for a in arrival_times):
                raise EngineError(f"arrival_times must give one time >= 0 (seconds) per prompt ({n})")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stop_token_ids = [int(t) for t in (stop_token_ids or [])]
        if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise EngineError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids per request, got {len(stop_token_ids)}")
        bad = [t for t in stop_token_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise EngineError(f"stop_token_ids {bad} are outside the vocabulary [0, {self.cfg.vocab_size})")
        start = now()
        out = []
        for i, (p, m) in enumerate(zip(prompts, budgets)):
            sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + i)
            arrival = start + (arrival_times[i] if arrival_times is not None else 0.0)
            out.append(self._request(self._encode(p, chat), i, m, sampling, stops, stop_token_ids, ignore_eos,
                                     arrival, track_text))
        return out

    def _queue(self, req: Request) -> None:
        req.index = self._next_index
        self._next_index += 1
        self._scheduler.add(req)

    def submit(self, prompt: Prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None,
               stop_token_ids: Sequence[int] | None = None, chat: bool = False,
               ignore_eos: bool = False) -> RequestHandle:
        """Queues one request; the returned handle streams its tokens (iterate it) or waits
        for its `result()`. Requests progress whenever the engine steps (any handle's
        iteration, `result()`, `step()` or `run()`)."""
        if self.role != "local":
            raise EngineError("a two-process engine serves whole batches: call generate() with the same "
                              "arguments in both processes")
        (req,) = self._prepare([prompt], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop=stop, stop_token_ids=stop_token_ids, chat=chat,
                               ignore_eos=ignore_eos, arrival_times=None,
                               track_text=self.tokenizer is not None)
        self._queue(req)
        return RequestHandle(self.step, req)

    def step(self) -> None:
        """One round of the scheduler (dispatches, and reads back what finished)."""
        self._scheduler.step()

    @property
    def stats(self) -> dict[str, int]:
        """Since the engine was built: prefill chunks, decode steps, and decode steps
        dispatched while prefill was running on other devices."""
        return dict(self._scheduler.stats)

    def has_unfinished(self) -> bool:
        return self._scheduler.has_work()

    def run(self) -> None:
        """Steps until every submitted request has finished."""
        while self._scheduler.has_work():
            self._scheduler.step()

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int | Sequence[int] = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                 chat: bool = False, ignore_eos: bool = False, stream: Callable[[int, str], None] | None = None,
                 arrival_times: Sequence[float] | None = None) -> EngineResult:
        """Serves a list of prompts (strings, chat message lists or token id lists) and
        returns their results in order. `max_new_tokens` is one number or one per prompt;
        `stop_token_ids` end a request like EOS does (kept in its token ids, not its text);
        request i samples with seed `seed + i`. `arrival_times` (seconds from now) replays
        a trace: request i is not started before its time. `stream(i, text)` is called as
        request i's text grows."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        reqs = self._prepare(list(prompts), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, stop=stop, stop_token_ids=stop_token_ids, chat=chat,
                             ignore_eos=ignore_eos, arrival_times=arrival_times, track_text=stream is not None)
        start = now()
        steps0 = self._scheduler.decode.steps if self._scheduler.decode is not None else 0
        for r in reqs:
            r.stream_callback = stream
            self._queue(r)
        self.run()
        steps = (self._scheduler.decode.steps if self._scheduler.decode is not None else 0) - steps0
        for r in reqs:
            r.deltas.clear()
        if self.role == "local":
            outputs = [r.result() for r in reqs]
            wall_ms = (max(r.finish_time for r in reqs) - start) * 1e3
        else:
            self._calls += 1
            outputs, wall_ms, steps = self._exchange(reqs, start, steps, f"results/{self._calls}")
        return EngineResult(outputs=outputs, wall_ms=wall_ms, decode_steps=steps)

    def _exchange(self, reqs: list[Request], start: float, steps: int, name: str):
        """Two-process engine: the decode process has the tokens and decode times, the
        prefill process (and its notes) the queueing and first-token times; the decode
        process sends its part, and both return the same results."""
        if self.role == "decode":
            mine = [{"token_ids": r.output.token_ids, "tpot_ms": r.result().tpot_ms,
                     "latency_ms": (r.finish_time - r.arrival) * 1e3,
                     "token_times_ms": r.result().token_times_ms} for r in reqs]
            message = {"requests": mine, "wall_ms": (max(r.finish_time for r in reqs) - start) * 1e3,
                       "steps": steps}
            self._channel.put(name, message)
        else:
            message = self._channel.wait(name)
        outputs = []
        for r, d in zip(reqs, message["requests"]):
            if self.role == "decode":
                queued, ttft = r.remote["queued_s"] * 1e3, r.remote["ttft_s"] * 1e3
                out = r.output
            else:
                queued, ttft = (r.prefill_start - r.arrival) * 1e3, (r.first_token_time - r.arrival) * 1e3
                out = SequenceOutput(max_new_tokens=r.max_new_tokens, stop_ids=r.output.stop_ids,
                                     stop_strings=r.output.stop_strings, detokenize=self._detokenize())
                for t in d["token_ids"]:
                    out.add(t)
            outputs.append(RequestOutput(index=r.index, text=out.final_text(), token_ids=list(out.token_ids),
                                         prompt_token_ids=list(r.prompt), finish_reason=out.finish_reason,
                                         ttft_ms=ttft, tpot_ms=d["tpot_ms"], queued_ms=queued,
                                         latency_ms=d["latency_ms"], token_times_ms=d["token_times_ms"]))
        return outputs, message["wall_ms"], message["steps"]


def _check_memory(shapes, sharding: ModelSharding, slots: int, length: int) -> None:
    """Refuses a decode cache larger than a device's free memory (where the backend says),
    before anything is allocated."""
    need = bytes_per_device(shapes)
    for device in sharding.mesh.devices.flat:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends do not report memory
            stats = None
        if not stats or "bytes_limit" not in stats:
            continue
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if need > free:
            raise EngineError(f"the decode policy ({sharding.table_name}) cannot hold the cache: {slots} slots x "
                              f"{length} tokens need {need / 2**30:.2f} GiB per device, but {device} has "
                              f"{free / 2**30:.2f} GiB free (use fewer slots, a shorter max_len, or split the "
                              "cache more: attention DP over slots, DCP over tokens)")
