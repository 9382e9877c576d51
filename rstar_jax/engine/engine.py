"""The inference engine's host side: requests in, completions out, the device kept busy.

    engine = Engine(model, tokenizer, EngineConfig(slots=64))
    engine.set_shared_prefix(few_shot_ids)           # optional: the prefix every request may continue
    engine.submit(Request(prompt_ids, SamplingConfig(num_samples=8, temperature=0.8, stop=...), key))
    for request, completions in engine.completions():   # as requests finish; submit more at any time
        ...

Continuous batching. Each request's prompt (after the shared prefix) is prefilled in fixed chunks into a free
prompt entry of the least loaded data group, several chunks (of one prompt or of several) per prefill call; its K
samples become lanes of the entry, and free decode slots take pending lanes inside the decode program, token by
token, so no slot waits for its neighbours. A request with more samples than an entry has lanes spans several
entries. The host keeps samples for about half of each group's slots ready (pending) ahead of them.

The host stays off the token path: it dispatches the next program before reading the last one's `Report`
(JAX dispatch is asynchronous), reads the small lane arrays after each call, and reads a request's tokens and
detokenises them once, when all its samples are done. Only requests with stop strings the device table cannot
hold have their running samples' new tokens checked after each decode call (`stops`).

Programs: `shared_prefill` once per shared prefix, `prefill` once per chunk size, `decode` once per prompt bucket
(on the CPU path one of each: unreached prompt blocks are skipped inside), plus `init_state`; none depends on how
many requests, samples, rollouts or depths a job has.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.backends import cpu
from rstar_jax.engine import programs
from rstar_jax.engine.api import Completion, Request, RequestError
from rstar_jax.engine.config import EngineConfig
from rstar_jax.engine.layers import PrefillRows
from rstar_jax.engine.model import InferenceModel
from rstar_jax.engine.state import DONE, KEY_SHAPE, PENDING, REASON_STOP, RUNNING, init_state
from rstar_jax.engine.stops import StopRegistry, finish

READY = 0.5  # samples kept ready (prefilled, waiting for a slot) per group, as a share of its slots
SHARED_PAD = 64  # the shared prefix is padded to a multiple of this (one program per run's prefix)
TRIM_EVERY_S = 10.0


class Finished(NamedTuple):
    id: int  # what `submit` returned
    request: Request
    completions: list[Completion]  # sample order


@dataclasses.dataclass
class _Job:
    """One entry's share of a request: lanes sample0 .. sample0 + lanes - 1."""

    request: int
    ids: tuple[int, ...]  # the prompt after the shared prefix
    shared: bool
    sample0: int
    lanes: int
    group: int = -1
    entry: int = -1
    order: int = 0
    sent: int = 0  # prompt tokens dispatched to prefill
    ready_call: int | None = None  # the call that finished its prefill (reports from then on describe it)
    checked: list[int] = dataclasses.field(default_factory=list)  # per lane, tokens checked for host stops


@dataclasses.dataclass
class _InFlight:
    request: Request
    jobs: list[_Job]
    host_stops: tuple[str, ...]  # stop strings the device table does not hold
    device_stops: np.ndarray  # [M] bool
    done: dict[int, list[Completion]] = dataclasses.field(default_factory=dict)  # sample0 -> completions


class Engine:
    def __init__(self, model: InferenceModel, tokenizer, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lay = config.layout(model.mesh.shape["data"])
        lay, cfg = self.lay, model.cfg
        self.state = init_state(lay, cfg, model.dtype, model.tuned, model.mesh)
        self.shared = programs.empty_shared_prefix(cfg, model.dtype)
        self.shared_ids: tuple[int, ...] = ()
        self.stops = StopRegistry(tokenizer, lay.stops, lay.stop_len, cfg.vocab_size)
        self.eos = set(cfg.eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.eos_rows = [r for r in (self.stops.eos(t) for t in sorted(self.eos)) if r is not None]
        self.table = self.stops.table()
        self.requests: dict[int, _InFlight] = {}
        self.waiting: collections.deque[_Job] = collections.deque()
        self.entries: list[list[_Job | None]] = [[None] * lay.entries for _ in range(lay.groups)]
        self.pending = np.zeros(lay.groups, np.int64)  # lanes waiting for a slot, as last reported
        self.running = np.zeros(lay.groups, np.int64)
        self.cancel = np.zeros((lay.groups, lay.entries, lay.lanes), np.int8)
        self.inflight: collections.deque[tuple[int, Any]] = collections.deque()
        self.calls = 0
        self.ids = itertools.count()
        self.orders = itertools.count()
        self.last_trim = time.monotonic()
        self.stats = collections.Counter()  # calls and tokens, for reports of where time goes

    # -- requests in

    def set_shared_prefix(self, ids: Sequence[int]) -> None:
        """Cache the keys/values of `ids`: requests whose prompt continues it attend to it without prefilling it."""
        ids = tuple(int(i) for i in ids)
        if ids == self.shared_ids:
            return
        if self.requests:
            raise RuntimeError("set_shared_prefix: requests are in flight")
        if not ids:
            self.shared, self.shared_ids = programs.empty_shared_prefix(self.model.cfg, self.model.dtype), ()
            return
        tokens = np.zeros((1, -(-len(ids) // SHARED_PAD) * SHARED_PAD), np.int32)
        tokens[0, : len(ids)] = ids
        self.shared = programs.shared_prefill(self.model.params, tokens, np.int32(len(ids)), cfg=self.model.cfg,
                                              tuned=self.model.tuned)
        self.shared_ids = ids

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. Checked here, before any work, with one line naming what is wrong."""
        s, lay = request.sampling, self.lay
        prompt = tuple(int(i) for i in request.prompt)
        if not prompt:
            raise RequestError("request: the prompt has no tokens")
        shared = bool(self.shared_ids) and len(prompt) > len(self.shared_ids) and prompt[: len(self.shared_ids)] == self.shared_ids
        ids = prompt[len(self.shared_ids):] if shared else prompt
        if len(ids) > lay.max_prompt:
            raise RequestError(f"request: the prompt has {len(ids)} tokens after the shared prefix; engine.max_prompt "
                               f"is {lay.max_prompt}")
        if s.max_new_tokens > lay.suffix:
            raise RequestError(f"request: max_new_tokens={s.max_new_tokens} is above engine.max_new_tokens={lay.suffix}")
        if any(t < 0 or t >= self.model.cfg.vocab_size for t in prompt):
            raise RequestError(f"request: token ids must be in [0, {self.model.cfg.vocab_size})")
        rows = [] if s.ignore_eos else list(self.eos_rows)
        host_stops = []
        for text in s.stop:
            row = self.stops.string(text)
            host_stops += [text] if row is None else []
            rows += [] if row is None else [row]
        self.table = self.stops.table()
        rid = next(self.ids)
        jobs = [_Job(rid, ids, shared, s0, min(lay.lanes, s.num_samples - s0)) for s0 in range(0, s.num_samples, lay.lanes)]
        self.requests[rid] = _InFlight(request, jobs, tuple(host_stops), self.stops.mask(rows))
        self.waiting.extend(jobs)
        return rid

    # -- completions out

    def completions(self) -> Iterator[Finished]:
        """Run until every submitted request finished, yielding each as it does (more may be submitted meanwhile)."""
        while self.requests:
            yield from self.step()

    def run(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """The completions of `requests`, in order."""
        ids = [self.submit(r) for r in requests]
        got = {f.id: f.completions for f in self.completions()}
        return [got[i] for i in ids]

    def step(self) -> list[Finished]:
        """Dispatch the next programs, then read every report but the newest (or all, with nothing to dispatch)."""
        dispatched = self._dispatch()
        out = []
        while len(self.inflight) > (1 if dispatched else 0):
            out += self._read(*self.inflight.popleft())
        if self.model.tuned and time.monotonic() - self.last_trim > TRIM_EVERY_S:
            cpu.release_free_host_memory()
            self.last_trim = time.monotonic()
        return out

    # -- dispatch

    def _free_entry(self, d: int) -> int | None:
        return next((p for p, j in enumerate(self.entries[d]) if j is None), None)

    def _plan_prefill(self) -> list[list[tuple[_Job, int, int]]]:
        """Per group, up to R rows (job, offset, tokens): unfinished prompts first, then new requests into free
        entries of the groups with the fewest samples ready or coming, up to READY of a group's slots."""
        lay = self.lay
        plan: list[list[tuple[_Job, int, int]]] = [[] for _ in range(lay.groups)]
        coming = self.pending.copy()
        for d in range(lay.groups):
            for job in self.entries[d]:
                if job is not None and job.ready_call is None:
                    coming[d] += job.lanes

        def fill(job: _Job) -> None:
            rows = plan[job.group]
            while job.sent < len(job.ids) and len(rows) < lay.rows:
                n = min(lay.chunk, len(job.ids) - job.sent)
                rows.append((job, job.sent, n))
                job.sent += n

        for d in range(lay.groups):
            for job in self.entries[d]:
                if job is not None and job.sent < len(job.ids):
                    fill(job)
        while self.waiting:
            open_groups = [d for d in range(lay.groups)
                           if len(plan[d]) < lay.rows and coming[d] < READY * lay.slots and self._free_entry(d) is not None]
            if not open_groups:
                break
            d = min(open_groups, key=lambda g: (coming[g] + self.running[g], g))
            job = self.waiting.popleft()
            job.group, job.entry, job.order = d, self._free_entry(d), next(self.orders)
            self.entries[d][job.entry] = job
            coming[d] += job.lanes
            fill(job)
        return plan

    def _prefill_rows(self, plan: list[list[tuple[_Job, int, int]]]) -> PrefillRows:
        lay = self.lay
        D, R, C, M = lay.groups, lay.rows, lay.chunk, lay.stops
        a = dict(tokens=np.zeros((D, R, C), np.int32), entry=np.zeros((D, R), np.int32),
                 offset=np.zeros((D, R), np.int32), n=np.zeros((D, R), np.int32), last=np.zeros((D, R), bool),
                 shared=np.zeros((D, R), bool), key=np.zeros((D, R, *KEY_SHAPE), np.uint32),
                 sample0=np.zeros((D, R), np.int32), lanes=np.zeros((D, R), np.int32), order=np.zeros((D, R), np.int32),
                 temperature=np.zeros((D, R), np.float32), top_p=np.ones((D, R), np.float32),
                 top_k=np.zeros((D, R), np.int32), max_new=np.ones((D, R), np.int32), stops=np.zeros((D, R, M), bool))
        for d, rows in enumerate(plan):
            for r, (job, offset, n) in enumerate(rows):
                req = self.requests[job.request]
                s = req.request.sampling
                a["tokens"][d, r, :n] = job.ids[offset : offset + n]
                a["entry"][d, r], a["offset"][d, r], a["n"][d, r] = job.entry, offset, n
                a["last"][d, r] = offset + n == len(job.ids)
                a["shared"][d, r], a["key"][d, r] = job.shared, np.asarray(jax.random.key_data(req.request.key))
                a["sample0"][d, r], a["lanes"][d, r], a["order"][d, r] = job.sample0, job.lanes, job.order
                a["temperature"][d, r], a["top_p"][d, r], a["top_k"][d, r] = s.temperature, s.top_p, s.top_k
                a["max_new"][d, r], a["stops"][d, r] = s.max_new_tokens, req.device_stops
        return PrefillRows(*(a[f] for f in ("tokens", "entry", "offset", "n", "last", "shared", "key", "sample0", "lanes",
                                            "order", "temperature", "top_p", "top_k", "max_new", "stops")))

    def _read_blocks(self, tokens: int) -> int:
        """Prompt blocks a program reads: all on the CPU path (skipped inside when unreached), else a bucket."""
        return self.lay.blocks if self.model.tuned else self.lay.bucket(tokens)

    def _dispatch(self) -> int:
        m, lay = self.model, self.lay
        calls = 0
        plan = self._plan_prefill()
        if any(plan):
            end = max(off + n for rows in plan for _, off, n in rows)
            self.state, rep = programs.prefill(m.params, self.state, self.shared, self.table, self._prefill_rows(plan),
                                               cfg=m.cfg, lay=lay, read=self._read_blocks(end), tuned=m.tuned)
            for rows in plan:
                for job, off, n in rows:
                    if off + n == len(job.ids):
                        job.ready_call = self.calls
                        self.pending[job.group] += job.lanes
            self._sent(rep, "prefill", sum(n for rows in plan for _, _, n in rows))
            calls += 1
        if (self.pending + self.running).any():
            longest = max((len(j.ids) for g in self.entries for j in g if j is not None), default=1)
            self.state, rep = programs.decode(m.params, self.state, self.shared, self.table, self.cancel, cfg=m.cfg,
                                              lay=lay, read=self._read_blocks(longest), tuned=m.tuned)
            self.cancel = np.zeros_like(self.cancel)
            self._sent(rep, "decode", lay.steps)
            calls += 1
        return calls

    def _sent(self, rep, kind: str, amount: int) -> None:
        self.inflight.append((self.calls, rep))
        self.calls += 1
        self.stats[f"{kind}_calls"] += 1
        self.stats[f"{kind}_{'tokens' if kind == 'prefill' else 'steps'}"] += amount

    # -- reports

    def _read(self, call: int, rep) -> list[Finished]:
        lanes_state = np.asarray(rep.lane_state_DxPxK)
        tokens = None  # read only when some request needs its tokens
        out = []
        pending = np.zeros_like(self.pending)
        running = np.zeros_like(self.running)
        for d, group in enumerate(self.entries):
            for p, job in enumerate(group):
                if job is None or job.ready_call is None or job.ready_call > call:
                    continue
                state = lanes_state[d, p, : job.lanes]
                req = self.requests[job.request]
                if (state == DONE).all():
                    if tokens is None:
                        tokens, length = np.asarray(rep.out_tokens_DxPxKxT), np.asarray(rep.out_len_DxPxK)
                    req.done[job.sample0] = [self._completion(req, tokens[d, p, k, : length[d, p, k]])
                                             for k in range(job.lanes)]
                    group[p] = None
                    if len(req.done) == len(req.jobs):
                        del self.requests[job.request]
                        out.append(Finished(job.request, req.request, [c for s0 in sorted(req.done) for c in req.done[s0]]))
                    continue
                pending[d] += int((state == PENDING).sum())
                running[d] += int((state == RUNNING).sum())
                if req.host_stops:
                    if tokens is None:
                        tokens, length = np.asarray(rep.out_tokens_DxPxKxT), np.asarray(rep.out_len_DxPxK)
                    self._check_host_stops(req, job, tokens[d, p], length[d, p], state)
        # jobs made ready after this call are not in its report yet
        for group in self.entries:
            for job in group:
                if job is not None and job.ready_call is not None and job.ready_call > call:
                    pending[job.group] += job.lanes
        self.pending, self.running = pending, running
        return out

    def _check_host_stops(self, req: _InFlight, job: _Job, tokens_KxT: np.ndarray, length_K: np.ndarray,
                          state_K: np.ndarray) -> None:
        """Cancel running lanes whose new text holds a stop string the device does not match."""
        if not job.checked:
            job.checked = [0] * job.lanes
        margin = self.lay.stop_len
        for k in range(job.lanes):
            n = int(length_K[k])
            if state_K[k] not in (PENDING, RUNNING) or n <= job.checked[k]:
                continue
            text = self.tokenizer.decode(tokens_KxT[k, max(0, job.checked[k] - margin) : n].tolist())
            if any(s in text for s in req.host_stops):
                self.cancel[job.group, job.entry, k] = REASON_STOP
            job.checked[k] = n

    def _completion(self, req: _InFlight, ids: np.ndarray) -> Completion:
        s = req.request.sampling
        ids_list, text, stopped = finish(self.tokenizer, ids.tolist(), set() if s.ignore_eos else self.eos, s.stop)
        self.stats["tokens"] += len(ids_list)
        return Completion(text, ids_list, "stop" if stopped else "length")
