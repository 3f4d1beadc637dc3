"""Prompts prefilled ahead of their slots.

A new request whose whole prompt fits one chunk is prefilled in a group (`serving.slots.prefill_rows`: the
prompts that arrived together, left-padded and batched, into a cache of their own) before a slot is free for
it, on the prefill thread beside the running decode call. As slots free, the group's rows are put into them
(`insert_rows`) before the next decode call is dispatched, first come first served: a freed slot decodes again
in the very next call, and prompts are prefilled several at a time even when slots free one at a time (on the
CPU a 64-token prompt alone costs 0.35 ms per token of the benchmark model, in a batch of eight 0.21; a group is
padded to its longest prompt, which takes back much of that when lengths differ).

The engine starts a new group when at most half the slots' worth of staged rows are left (so it is mostly
done before the slots free: in-process, 64 requests at once on 8 slots, 5 of 5 rounds faster than starting at
one row left, 3.28 against 3.58 s) and none is being prefilled; it takes the longest first-come run of groupable
waiting requests whose padded batch fits the step's token budget, and at most max_num_seqs rows are staged in
all (the memory pre-flight counts a cache of that many rows).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from concurrent.futures import Future

import numpy as np

from serving.request import Request
from serving.slots import bucket, group_rows, group_sizes


@dataclasses.dataclass(eq=False)
class StagedGroup:
    requests: list[Request]  # row i's request (rows past them pad the batch)
    future: Future  # prefill_rows' (logits [G, V], cache of G rows)
    mask: np.ndarray  # [G, B] int32, the real tokens of each row
    taken: int = 0  # rows before this one have left the group (placed in slots, or cancelled)


class Staging:
    """The staged groups, oldest first; only the engine's thread uses it."""

    def __init__(self, num_slots: int, prefill_chunk: int, max_model_len: int):
        self.num_slots, self.prefill_chunk, self.max_model_len = num_slots, prefill_chunk, max_model_len
        self.low_water = max(num_slots // 2, 1)  # staged rows left at or below which the next group starts
        self.groups: deque[StagedGroup] = deque()

    def groupable(self, r: Request) -> bool:
        """A new request whose prompt fits one chunk, with room for its max_tokens after the padded prompt."""
        n = len(r.prompt_ids)
        return (r.prefilled == 0 and n <= self.prefill_chunk
                and bucket(n) + r.sampling.max_tokens <= self.max_model_len)

    def choose(self, waiting: list[Request], budget: int) -> list[Request]:
        """The next group: the longest first-come run of groupable requests, within the rows staging has room
        for, whose padded batch fits `budget` tokens (the first one whatever its size), cut to a compiled row
        count (`group_sizes`) so that no row is padding."""
        group: list[Request] = []
        for r in waiting[:self.num_slots - len(self)]:
            if not self.groupable(r):
                break
            rows = group_rows(len(group) + 1, self.num_slots)
            if rows * max(bucket(len(x.prompt_ids)) for x in group + [r]) > budget and group:
                break
            group.append(r)
        while group and len(group) not in group_sizes(self.num_slots):  # a padding row: a prompt's compute
            group.pop()
        return group

    def __len__(self) -> int:
        return len(self.requests())

    def requests(self) -> list[Request]:
        """The staged requests not yet in slots (cancelled ones that finished left out)."""
        return [r for g in self.groups for r in g.requests[g.taken:] if not r.finished]

    def wants_group(self) -> bool:
        return len(self) <= self.low_water and all(g.future.done() for g in self.groups)

    def add(self, requests: list[Request], future: Future, mask: np.ndarray) -> None:
        self.groups.append(StagedGroup(list(requests), future, mask))

    def take(self, n: int) -> list[tuple[StagedGroup, list[tuple[int, Request]]]]:
        """Up to n staged requests, first come first served (finished ones, cancelled while staged, leave
        unplaced): per group, its (row, request) pairs; emptied groups are dropped (their caches freed)."""
        out = []
        while self.groups:
            g, rows = self.groups[0], []
            while g.taken < len(g.requests) and (n > 0 or g.requests[g.taken].finished):
                r = g.requests[g.taken]
                if not r.finished:
                    rows.append((g.taken, r))
                    n -= 1
                g.taken += 1
            if rows:
                out.append((g, rows))
            if g.taken < len(g.requests):
                break
            self.groups.popleft()
        return out

    def clear(self) -> None:
        self.groups.clear()
