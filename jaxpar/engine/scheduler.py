"""The engine loop: arrivals -> prefill chunks -> transfer -> insert -> decode steps.

Every call of `Scheduler.step` does a little of each and never blocks while there is
something else to dispatch:

1. requests whose arrival time has come wait, first come first served, for a prefill row;
2. one chunk (advancing every busy prefill row) is dispatched per round: on shared devices
   chunks and decode steps alternate, so a long prompt delays decoding by one chunk per
   step at most; on separate prefill devices a chunk starts once the previous one is done
   and runs alongside decode;
3. a finished prompt's payload is copied to the decode layout (asynchronously) and
   inserted into a free slot as soon as there is one;
4. a decode step is dispatched for all slots, and the step before it is read back, so the
   host's reading, stop checks and detokenising overlap the device's next step.
A request that ends (EOS, stop string, its `max_new_tokens`) frees its slot at once.

In a two-process run the prefill process only does 1-2 and sends payloads in order (each
followed by a note with its request, first token and times, once the first token is read);
the decode process posts a receive per note, in the same order, and does 3-4.
"""

from __future__ import annotations

import bisect
import collections
import time

import numpy as np

from jaxpar.engine.requests import Request, now
from jaxpar.engine.transfer import ReceiveLink, SendLink
from jaxpar.engine.workers import DecodeWorker, PrefillWorker


class Scheduler:
    """Host-side state of every request, and one round of dispatching at a time."""

    def __init__(self, prefill: PrefillWorker | None, decode: DecodeWorker | None, link,
                 *, stage_limit: int, shared_devices: bool):
        self.prefill = prefill
        self.decode = decode
        self.link = link
        # Prefill and decode queue on the same devices (so work runs in dispatch order).
        self.shared_devices = shared_devices
        # How many prefilled requests may wait for a slot (payloads held on the devices).
        self.stage_limit = stage_limit
        self.arriving: list[Request] = []  # sorted by arrival time
        self.waiting: collections.deque[Request] = collections.deque()
        # Payloads extracted on the prefill devices, sent once computed (a copy to other
        # devices waits for its source, and the host must not wait for prefill).
        self.extracted: collections.deque = collections.deque()  # (request, payload)
        self.ready: collections.deque = collections.deque()  # (request, payload on decode devices)
        self.unread_first: list[Request] = []
        self.receives: collections.deque = collections.deque()  # posted receives (two-process decode)
        self.expected = 0  # payloads the decode process will receive in all
        self.by_index: dict[int, Request] = {}
        self.live: set[int] = set()
        # Counters: prefill chunks, decode steps, and decode steps dispatched while a prefill
        # chunk was still running on other devices (the PD overlap).
        self.stats = {"prefill_chunks": 0, "decode_steps": 0, "overlapped_steps": 0}

    # ------------------------------------------------------------------ bookkeeping

    def add(self, req: Request) -> None:
        self.by_index[req.index] = req
        self.live.add(req.index)
        bisect.insort(self.arriving, req, key=lambda r: r.arrival)
        if isinstance(self.link, ReceiveLink):
            self.expected += 1

    def has_work(self) -> bool:
        if isinstance(self.link, SendLink):  # the prefill process is done once all is sent
            return bool(self.arriving or self.waiting or (self.prefill and self.prefill.active)
                        or self.extracted or self.unread_first)
        return bool(self.live)

    def _finish(self, req: Request) -> None:
        self.live.discard(req.index)
        if self.decode is not None:
            self.decode.release(req)
        self.ready = collections.deque((r, p) for r, p in self.ready if r is not req)

    def _add_token(self, req: Request, token: int, t: float) -> None:
        req.add_token(token, t)
        if req.done:
            self._finish(req)

    def _read_first(self, block: bool) -> bool:
        progressed = False
        for req in list(self.unread_first):
            if block or req.first[0].is_ready():
                self._read_first_of(req)
                progressed = True
        return progressed

    def _read_first_of(self, req: Request, t: float | None = None) -> None:
        array, row = req.first
        self.unread_first.remove(req)
        req.first = None
        token = int(np.asarray(array)[row])
        self._add_token(req, token, now() if t is None else t)
        if isinstance(self.link, SendLink):
            req.first_token = token
            self._note(req)

    def _note(self, req: Request) -> None:
        """Two-process prefill: once a request's payload is sent and its first token read,
        tells the decode process what it is about to receive."""
        if req.message is None or req.first is not None:
            return
        self.link.note(req.message, {"request": req.index, "token": req.first_token,
                                     "queued_s": req.prefill_start - req.arrival,
                                     "ttft_s": req.first_token_time - req.arrival})

    # ------------------------------------------------------------------ one round

    def step(self) -> None:
        t = now()
        while self.arriving and self.arriving[0].arrival <= t:
            self.waiting.append(self.arriving.pop(0))
        progressed = self._read_first(block=False)
        progressed |= self._ship()
        progressed |= self._prefill(t)
        progressed |= self._receive()
        progressed |= self._insert()
        progressed |= self._decode()
        if not progressed:
            self._wait()

    def _prefill(self, t: float) -> bool:
        p = self.prefill
        if p is None:
            return False
        staged = len(self.ready) + len(self.extracted) + p.active
        limit = self.stage_limit + (self.decode.table.free_count() if self.decode is not None else 0)
        while self.waiting and p.has_free_row() and (isinstance(self.link, SendLink) or staged < limit):
            p.admit(self.waiting.popleft(), t)
            staged += 1
        # On shared devices one chunk goes between two decode steps (the device runs them in
        # dispatch order); on its own devices prefill starts a chunk when the last is done.
        if not p.active or (not self.shared_devices and not p.idle()):
            return False
        self.stats["prefill_chunks"] += 1
        for req, payload, first in p.dispatch():
            req.first = (first, req.prefill_row)
            req.first_before_step = self.decode.steps if self.decode is not None else 0
            self.unread_first.append(req)
            self.extracted.append((req, payload))
        return True

    def _ship(self, block: bool = False) -> bool:
        """Sends computed payloads towards decode, in order."""
        progressed = False
        while self.extracted and (block or self.extracted[0][1].token.is_ready()):
            req, payload = self.extracted.popleft()
            if isinstance(self.link, SendLink):
                req.message = self.link.send(payload)
                self._note(req)
            elif not req.done:
                self.ready.append((req, self.link.send(payload)))
            progressed = True
            block = False
        return progressed

    def _receive(self) -> bool:
        if not isinstance(self.link, ReceiveLink):
            return False
        progressed = False
        while (self.link.posted < self.expected
               and len(self.receives) + len(self.ready) < self.stage_limit + self.decode.table.free_count()):
            posted = self.link.post()
            if posted is None:
                break
            self.receives.append(posted)
            progressed = True
        while self.receives and self.receives[0][0].token.is_ready():
            payload, note = self.receives.popleft()
            req = self.by_index[note["request"]]
            if int(np.asarray(payload.request)[0]) != req.index:
                raise RuntimeError(f"payload for request {int(np.asarray(payload.request)[0])} arrived "
                                   f"where request {req.index} was announced")
            req.remote = note
            req.prefill_start = req.arrival + note["queued_s"]
            self._add_token(req, note["token"], now())
            if not req.done:
                self.ready.append((req, payload))
            progressed = True
        return progressed

    def _insert(self) -> bool:
        d = self.decode
        if d is None:
            return False
        progressed = False
        while self.ready and d.has_free_slot():
            req, payload = self.ready.popleft()
            if req.done:  # ended on its first token
                continue
            d.insert(req, payload)
            progressed = True
        return progressed

    def _decode(self) -> bool:
        d = self.decode
        if d is None:
            return False
        dispatched = False
        if d.busy:
            if not self.shared_devices and self.prefill is not None and not self.prefill.idle():
                self.stats["overlapped_steps"] += 1
            d.dispatch()
            dispatched = True
            self.stats["decode_steps"] += 1
        # Keep one step in flight: read the older one (or the last one when nothing is busy).
        if len(d.pending) > 1 or (d.pending and not dispatched):
            if self.shared_devices:
                # First tokens computed before this step on the same devices are done before
                # it: read them first, so their time is theirs, not the step's.
                step = d.pending[0][0]
                for req in [r for r in self.unread_first if r.first_before_step <= step]:
                    self._read_first_of(req)
            results = d.read_oldest()
            t = now()
            for req, token in results:
                if req.done:
                    continue
                if req.first is not None:  # the first token precedes the decoded ones
                    self._read_first_of(req, t)
                self._add_token(req, token, t)
        return dispatched

    def _wait(self) -> None:
        """Nothing could be dispatched: block on whatever finishes next."""
        if self.unread_first and self._read_first(block=False):
            return
        if self.extracted:
            self._ship(block=True)
        elif self.prefill is not None and self.prefill.active and not self.prefill.idle():
            self.prefill.wait()
        elif self.receives:
            self.receives[0][0].token.block_until_ready()
        elif self.unread_first:
            self._read_first(block=True)
        elif self.arriving and not self.waiting:
            time.sleep(max(0.0, min(self.arriving[0].arrival - now(), 0.05)))
        elif isinstance(self.link, ReceiveLink) and self.live and not self.decode.busy:
            time.sleep(0.002)  # waiting for the prefill process's next note

