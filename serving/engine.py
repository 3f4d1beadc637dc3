"""The continuous-batching engine: a fixed number of slots over one slot-indexed hybrid cache
(`serving.slots`), and one loop in which every step

  (a) empties cancelled requests' slots, fills free slots first come first served and feeds prompts within
      `max_num_batched_tokens` less the decoding slots: whole prompts prefilled ahead in groups, beside (b)
      on a thread of its own, then put into slots (`serving.staging`); the rest in pieces in their slots;
  (b) runs `decode_steps` compiled decode steps over every slot in one device call (fewer, a power of two,
      while requests wait and a slot's max_tokens end sooner: the call ends where that slot frees): each
      decoding slot samples its next token with its own settings from its logits and runs it through the
      model at its own position;
  (c) hands each request its new tokens and text, and retires those that end (end token, stop string,
      max_tokens), freeing their slots. A request whose max_tokens are all asked of dispatched calls frees
      its slot at once: the next step refills it while those tokens are still on their way.

Every shape is fixed at start-up (slots x max_model_len; prompt pieces of power-of-two lengths), and
`warmup()` compiles every program before the first request, so a steady load compiles nothing. The
start-up pre-flight refuses slots x length that cannot fit the device in one line with the figures.
The loop runs in a thread of its own (`start` / `stop`); `submit` and `cancel` may come from any thread,
and a request's `on_output` is called from the engine's thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from common.errors import UserError
from common.sharding import DEFAULT_RULES, sharding_context, tree_shardings
from jamba_jax.params import param_logical_specs
from serving.config import EngineConfig, EngineConfigError, check_memory, memory_needed
from serving.metrics import EngineMetrics, compilations
from serving.request import DECODE, FINISHED, PREFILL, Output, Request
from serving.sampling import RequestError, SamplingParams
from serving.slots import (
    cache_logical_axes,
    compile_all,
    decode_slots,
    init_slots,
    insert_rows,
    kv_dtype,
    next_piece,
    pack_group,
    piece_sizes,
    prefill_rows,
    prefill_slot,
    reset_slot,
)
from serving.staging import Staging


class EngineStoppedError(RuntimeError):
    """The engine's loop ended on an internal error (a bug); new requests are refused (HTTP 500)."""


class QueueFullError(UserError):
    """The waiting queue is full: the request is refused (HTTP 503)."""


class Engine:
    def __init__(self, model, params, tokenizer, config: EngineConfig | None = None, end_ids=(), mesh=None,
                 rules=DEFAULT_RULES):
        """`mesh` (a jax Mesh of more than one device): the weights and the cache sharded by their logical axes
        under `rules` (tensor and expert parallel as the mesh's axes say), every program run under it."""
        config = config or EngineConfig()
        config.check()
        cfg, s = model.cfg, config.max_num_seqs
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.rules = rules
        shardings = (None, None)
        if self.mesh is not None:
            cache = jax.eval_shape(lambda: init_slots(cfg, s, config.max_model_len, config.cache_dtype))[0]
            shardings = (tree_shardings(params, param_logical_specs(cfg, params), self.mesh, rules),
                         tree_shardings(cache, cache_logical_axes(cfg, cache), self.mesh, rules))
        self.memory = check_memory(memory_needed(cfg, params, config, *shardings), config)
        self.params = params if self.mesh is None else jax.device_put(params, shardings[0])
        self.cache, self.logits = init_slots(cfg, s, config.max_model_len, config.cache_dtype)
        if self.mesh is not None:
            self.cache = jax.device_put(self.cache, shardings[1])
            self.logits = jax.device_put(self.logits, NamedSharding(self.mesh, PartitionSpec()))
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.metrics = EngineMetrics()
        self.slots: list[Request | None] = [None] * s
        self.waiting: deque[Request] = deque()
        self.staging = Staging(s, config.prefill_chunk, config.max_model_len)  # prompts prefilled ahead of slots
        self._sampling = {k: np.zeros(s, np.float32 if k in ("temperature", "top_p") else np.int32)
                          for k in ("temperature", "top_k", "top_p", "seed", "step")}
        self._ids = itertools.count()
        self._seeds = np.random.default_rng()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self._call_lengths = sorted(set(piece_sizes(config.decode_steps)) | {config.decode_steps})
        self._inflight = None  # the decode call whose tokens the host has not read yet
        self._prefiller = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jamba-prefill")
        self.error: Exception | None = None  # what stopped the loop, if anything did

    def _on_mesh(self):
        """The context every program runs in: the mesh and its rules, or nothing."""
        return contextlib.nullcontext() if self.mesh is None else sharding_context(self.mesh, self.rules)

    # ---- requests (any thread) ----
    def submit(self, prompt_ids, sampling: SamplingParams | None = None, on_output=None,
               request_id: str | None = None) -> Request:
        """Queues a request; raises RequestError (bad parameters, prompt too long) or QueueFullError."""
        prompt_ids, sampling = [int(t) for t in prompt_ids], sampling or SamplingParams()
        vocab, limit = self.model.cfg.vocab_size, self.config.max_model_len
        sampling.check(vocab)
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", "prompt")
        if len(prompt_ids) + sampling.max_tokens > limit:
            raise RequestError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                               f"exceeds the model's context of {limit} tokens (max_model_len)", "max_tokens")
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=int(self._seeds.integers(2**31)))
        request = Request(request_id or f"req-{next(self._ids)}", prompt_ids, sampling, on_output)
        with self._cv:
            if self.error is not None:
                raise EngineStoppedError(f"the engine stopped after an internal error: {self.error!r}")
            if len(self.waiting) >= self.config.max_queue:
                self.metrics.rejected.inc()
                raise QueueFullError(f"the queue holds {self.config.max_queue} waiting requests (max_queue)")
            self.waiting.append(request)
            self.metrics.waiting.set(len(self.waiting))
            self._cv.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Ends the request at the next step (its slot freed); a finished request is left as it is."""
        with self._cv:
            request.cancelled = True
            self._cv.notify()

    # ---- the loop (the engine's thread) ----
    def step(self) -> bool:
        """One engine step (module docstring); False when there was nothing to do."""
        with self._on_mesh():
            return self._step()

    def _step(self) -> bool:
        with self._cv:
            self._retire_cancelled()
        self._place()
        with self._cv:
            self._admit()
        if self.idle:
            return False
        decoding = [r for r in self.slots if r is not None and r.state == DECODE]
        beside = any(r.scheduled < r.sampling.max_tokens for r in decoding)  # a decode call follows
        budget = self.config.max_num_batched_tokens - len(decoding)
        budget -= self._stage(max(budget, 1), beside)
        self._prefill([r for r in self.slots if r is not None and r.state == PREFILL], budget)
        # the next decode call goes to the device before the previous call's tokens are read: the host's work
        # on them (text, stop checks, streaming) overlaps the device's. A request that those tokens end runs
        # on in the new call; its tokens there are dropped, and its slot is reset before reuse. (A prompt the
        # pieces above just finished decodes in this call too: left out, its Mamba state would run on unkept.)
        decoding = [r for r in self.slots if r is not None and r.state == DECODE
                    and r.scheduled < r.sampling.max_tokens]
        previous, self._inflight = self._inflight, self._dispatch(decoding) if decoding else None
        with self._cv:  # a request whose every token is asked of a dispatched call needs its slot no more: the
            for r in decoding:  # next step refills it (a slot waiting for its last call's tokens idles a call)
                if r.scheduled >= r.sampling.max_tokens and self.slots[r.slot] is r:
                    self._release(r)
        if previous is not None:
            self._collect(*previous)
        self.steps += 1
        return True

    def _retire_cancelled(self) -> None:
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._deliver(r, r.finish("cancelled"))
        for r in self.staging.requests():  # (its row is skipped when the group's rows are placed)
            if r.cancelled:
                self._deliver(r, r.finish("cancelled"))
        for r in self.slots:
            if r is not None and r.cancelled and not r.finished:
                self._deliver(r, r.finish("cancelled"))
                self._release(r)

    def _admit(self) -> None:
        """Waiting requests whose prompts are fed in pieces into free slots, while one heads the queue (a whole
        prompt heading it waits to be staged: first come first served)."""
        for slot, held in enumerate(self.slots):
            if held is None and self.waiting and not self.staging.groupable(self.waiting[0]):
                r = self.waiting.popleft()
                self.cache = reset_slot(self.model.cfg, self.cache, np.int32(slot))
                self._occupy(r, slot, PREFILL)
        self._count_queue()

    def _occupy(self, r: Request, slot: int, state: str) -> None:
        r.slot, r.state = slot, state
        self.slots[slot] = r
        for k in ("temperature", "top_k", "top_p", "seed"):
            self._sampling[k][slot] = getattr(r.sampling, k)

    def _count_queue(self) -> None:
        self.metrics.waiting.set(len(self.waiting) + len(self.staging))
        self.metrics.running.set(sum(r is not None for r in self.slots))

    def _place(self) -> None:
        """Staged requests into the free slots, oldest first (waiting for their group's prefill if it still
        runs): each row's keys, states and logits replace the slot's whole (`insert_rows`); they then decode."""
        free = [slot for slot, r in enumerate(self.slots) if r is None]
        for group, rows in self.staging.take(len(free)):
            new_logits, new = group.future.result()
            slots = np.full(group.mask.shape[0], len(self.slots), np.int32)  # (rows left out: past the cache)
            with self._cv:
                for row, r in rows:
                    slots[row] = free.pop(0)
                    self._occupy(r, int(slots[row]), DECODE)
                    r.prefilled = len(r.prompt_ids)
                    self.metrics.prompt_tokens.inc(len(r.prompt_ids))
            self.logits, self.cache = insert_rows(self.model.cfg, self.cache, self.logits, slots, group.mask,
                                                  new_logits, new)

    def _stage(self, budget: int, beside: bool) -> int:
        """When staging runs low, starts the prefill of the next group of waiting requests (`serving.staging`)
        on the prefill thread, and with `beside` (a decode call follows: a CPU decode call of few rows leaves
        the cores half idle) leaves it running; else places it at once. Returns the group's padded tokens."""
        if not self.staging.wants_group():
            return 0
        with self._cv:
            group = self.staging.choose(list(self.waiting), budget)
            for _ in group:
                self.waiting.popleft()
        if not group:
            return 0
        ids, mask = pack_group([r.prompt_ids for r in group], len(self.slots))
        dtype = kv_dtype(self.cache)

        def run():
            with self._on_mesh():  # (the mesh and its rules are the calling thread's)
                return jax.block_until_ready(prefill_rows(self.model, self.params, ids, mask, dtype))

        self.staging.add(group, self._prefiller.submit(run), mask)
        if not beside:
            self._place()
        return mask.size

    def _prefill(self, requests: list[Request], budget: int) -> None:
        """Pieces of the prompts in slots within `budget` tokens (at least one piece: prompts always advance),
        first come first served (`serving.slots`)."""
        budget = max(budget, 1)
        for r in requests:
            while budget > 0 and r.prefilled < len(r.prompt_ids):
                n = next_piece(len(r.prompt_ids) - r.prefilled, self.config.prefill_chunk, budget)
                piece = np.asarray([r.prompt_ids[r.prefilled:r.prefilled + n]], np.int32)  # (numpy: no convert program)
                self.logits, self.cache = prefill_slot(self.model, self.params, self.cache, self.logits,
                                                       np.int32(r.slot), piece)
                r.prefilled += n
                budget -= n
            if r.prefilled == len(r.prompt_ids) and r.state == PREFILL:
                r.state = DECODE
                self.metrics.prompt_tokens.inc(len(r.prompt_ids))

    def _call_length(self, decoding: list[Request]) -> int:
        """decode_steps, or while requests wait, the longest compiled length within the first end of a slot's
        max_tokens: a slot freed mid-call would idle for the rest of it (the serving benchmark's 64 requests, first
        come first served: 552 decode steps in calls of 8, 522 in calls of one)."""
        first_end = min(r.sampling.max_tokens - r.scheduled for r in decoding)
        if not (self.waiting or len(self.staging)) or first_end >= self.config.decode_steps:
            return self.config.decode_steps
        return max(n for n in self._call_lengths if n <= first_end)

    def _dispatch(self, decoding: list[Request]):
        """Starts one decode call (`_call_length` steps) over the slots; returns what `_collect` reads."""
        # a prompt fed in pieces continues from its slot's Mamba state: while one waits, decoding must leave the
        # inactive slots' states alone (a staged row replaces a slot's states whole); such calls keep
        # decode_steps (one compiled length for them: each length is a program compiled at start-up)
        half_fed = any(r is not None and r.state == PREFILL for r in self.slots)
        s, k = self._sampling, self.config.decode_steps if half_fed else self._call_length(decoding)
        active, budget = np.zeros(len(self.slots), bool), np.zeros(len(self.slots), np.int32)
        rows = []
        for r in decoding:
            active[r.slot] = True
            s["step"][r.slot] = r.scheduled
            budget[r.slot] = r.sampling.max_tokens - r.scheduled  # (the call stops the row there)
            rows.append((r, r.slot, min(k, int(budget[r.slot]))))
            r.scheduled += rows[-1][2]
        tokens, self.logits, self.cache = decode_slots(self.model, self.params, self.cache, self.logits, active,
                                                       s["temperature"], s["top_k"], s["top_p"], s["seed"], s["step"],
                                                       budget, k, half_fed)
        return tokens, rows

    def _collect(self, tokens, rows) -> None:
        """Hands each request the tokens a decode call made for it, up to where it ends."""
        tokens = np.asarray(tokens)  # [call length, slots]
        for r, slot, n in rows:
            outs = []
            for token in tokens[:n, slot]:
                if r.cancelled or r.finished:
                    break  # (a cancelled one is retired at the next step)
                outs.append(r.add_token(int(token), self.end_ids, self.tokenizer.decode))
                self.metrics.generation_tokens.inc()
            if outs:  # one delivery per call: a stream gets one event for the call's tokens
                self._deliver(r, Output("".join(o.text for o in outs), [t for o in outs for t in o.token_ids],
                                        outs[-1].finish_reason))
            if r.cancelled and not r.finished:  # (cancelled after its slot was released: not retired by _step)
                self._deliver(r, r.finish("cancelled"))
            if r.finished and self.slots[slot] is r:
                with self._cv:
                    self._release(r)

    def _release(self, r: Request) -> None:
        self.slots[r.slot] = None
        self.metrics.running.set(sum(x is not None for x in self.slots))

    def _deliver(self, r: Request, out: Output) -> None:
        if r.finished:
            self.metrics.finished(r)
        if r.on_output is not None:
            r.on_output(r, out)

    # ---- running ----
    def warmup(self) -> float:
        """Compiles every program a load can need (each prompt piece length, the decode step, the reset) on
        slot 0, then empties it; returns the seconds it took."""
        t0 = time.perf_counter()
        c = self.config
        with self._on_mesh():
            self.logits, self.cache = compile_all(self.model, self.params, self.cache, self.logits, c.prefill_chunk,
                                                  c.max_model_len, c.max_num_batched_tokens, self._call_lengths)
        return time.perf_counter() - t0

    def run_until_idle(self) -> None:
        """Steps until no request waits or runs (without the thread: tests, benchmarks)."""
        while self.step():
            pass

    def start(self) -> None:
        """Runs the loop in a daemon thread until `stop`."""
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jamba-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and self.idle:
                    self._cv.wait()
                if self._stopping and self.idle:
                    return
            try:
                self.step()
            except Exception as e:  # a bug: every request ends with "error" rather than waiting forever
                self._fail(e)
                return

    def _fail(self, error: Exception) -> None:
        logging.exception("the serving engine stopped")
        with self._cv:
            self.error = error
            flying = [r for r, _, _ in self._inflight[1]] if self._inflight is not None else []  # (slots released)
            pending = list(dict.fromkeys([r for r in self.slots if r is not None] + flying
                                         + self.staging.requests() + list(self.waiting)))
            self.waiting.clear()
            self.staging.clear()
            self.slots = [None] * len(self.slots)
            self._inflight = None
        for r in pending:
            if not r.finished:
                self._deliver(r, r.finish("error"))

    def stop(self, timeout: float | None = None) -> None:
        """Lets the running and waiting requests finish (drains), then ends the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def idle(self) -> bool:
        return (not self.waiting and not len(self.staging) and all(r is None for r in self.slots)
                and self._inflight is None)

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Runs `prompts` (lists of token ids) to the end on this thread; the finished requests, in order."""
        many = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        requests = [self.submit(p, s) for p, s in zip(prompts, many, strict=True)]
        self.run_until_idle()
        return requests


__all__ = ["Engine", "EngineConfig", "EngineConfigError", "FINISHED", "QueueFullError", "compilations"]
