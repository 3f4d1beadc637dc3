"""A request in the serving engine: its prompt and sampling settings, the tokens and text it has produced,
and the rule that decides when it ends (an end token, a stop string, max_tokens, a cancellation).

Text is produced incrementally (`Request._decode_new`): after each token the text it completes is appended,
and the part not yet emitted is handed on, except a tail that could still become a stop string (up to the
longest stop string less one character) or an unfinished UTF-8 character, which waits for the next token. A
stop string ends the output where it begins, even when it spans several tokens; the token that completed it
counts as generated.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from serving.sampling import SamplingParams

WAITING, PREFILL, DECODE, FINISHED = "waiting", "prefill", "decode", "finished"


@dataclasses.dataclass
class Output:
    """What one engine step adds to a request: new text and token ids, and its finish reason once it ends."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop", "length" or "cancelled"


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    on_output: Callable[[Request, Output], None] | None = None  # called from the engine's thread
    state: str = WAITING
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the slot's cache so far
    scheduled: int = 0  # tokens asked of decode calls so far (some may not have reached the host yet)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the output text so far (cut at a stop string)
    emitted: int = 0  # characters of `text` handed on
    _prefix: int = 0  # incremental detokenisation: output tokens decoded from here ...
    _read: int = 0  # ... and the text up to here already taken
    finish_reason: str | None = None
    cancelled: bool = False
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    token_times: list[float] = dataclasses.field(default_factory=list)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def add_token(self, token: int, end_ids: frozenset, decode: Callable[[list[int]], str]) -> Output:
        """Takes the token just sampled; returns what it adds (finishing the request when it ends it)."""
        self.token_times.append(time.perf_counter())
        s = self.sampling
        if (token in end_ids and not s.ignore_eos) or token in s.stop_token_ids:
            self._decode_new(decode, final=True)
            return self.finish("stop")  # an end token is not part of the output
        self.output_ids.append(token)
        self._decode_new(decode, final=len(self.output_ids) >= s.max_tokens)
        for stop in s.stop:
            at = self.text.find(stop, max(self.emitted - len(stop), 0))
            if at >= 0:
                self.text = self.text[:at]
                return self.finish("stop", [token])
        if len(self.output_ids) >= s.max_tokens:
            return self.finish("length", [token])
        hold = max((len(x) for x in s.stop), default=1) - 1
        return self._emit(len(self.text) - hold, [token], None)

    def _decode_new(self, decode: Callable[[list[int]], str], final: bool = False) -> None:
        """Appends the text the newest tokens complete. Incremental, as text-generation-inference does it: the
        tokens since a point a few tokens back are decoded with and without the newest ones (a tokenizer that
        drops a word's leading space at the start of a text still sees the left context), so a request's
        text costs O(length), not O(length^2); an unfinished UTF-8 character waits for its next token unless
        `final`. The text equals decoding the whole output (tests compare them)."""
        ids = self.output_ids
        before = decode(ids[self._prefix:self._read])
        after = decode(ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(ids)

    def finish(self, reason: str, token_ids: list[int] | None = None) -> Output:
        self.state, self.finish_reason = FINISHED, reason
        out = self._emit(len(self.text), token_ids or [], reason)
        self.done.set()
        return out

    def _emit(self, end: int, token_ids: list[int], reason: str | None) -> Output:
        end = max(end, self.emitted)
        out = Output(self.text[self.emitted:end], token_ids, reason)
        self.emitted = end
        return out

    # timing, for the metrics and benchmarks
    @property
    def time_to_first_token(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t[:-1], t[1:], strict=True)]
