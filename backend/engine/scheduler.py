"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Every step fills one batch under a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``). Running sequences go first, in arrival order: each asks for all the tokens it
has not computed yet (one for a decode, the rest of a prompt for a prefill), cut to the budget
left (chunked prefill). Waiting sequences then join first come, first served while budget, cap
and free blocks allow. When a running sequence cannot get a block, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backend.config import EngineConfig
from backend.engine.block_manager import BlockManager
from backend.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    """One step's batch: decodes (one new token) first, shortest context first (the attention
    groups decodes of similar length), then prefill chunks."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prefilled_tokens: int = 0  # prompt (and recomputed) tokens run through the model
    num_decoded_tokens: int = 0


def _batch_order(item: ScheduledSeq) -> tuple[bool, int]:
    """Decodes first, shortest context first; prefill chunks after, in their order (stable)."""
    is_decode = item.num_new_tokens == 1
    return not is_decode, item.seq.num_computed_tokens if is_decode else 0


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break
        # Admitting new work right after preempting would only thrash the cache.
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            # Without chunked prefill a sequence waits for a step with room for all of it,
            # unless it could never fit whole (a preempted one that outgrew the budget).
            if (n < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill
                    and seq.num_uncomputed_tokens <= self.config.max_num_batched_tokens):
                break
            if not bm.allocate(seq.block_table, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        out.scheduled.sort(key=_batch_order)
        for s in out.scheduled:
            if s.num_new_tokens == 1 and s.seq.num_computed_tokens >= s.seq.num_prompt_tokens:
                self.stats.num_decoded_tokens += 1
            else:
                self.stats.num_prefilled_tokens += s.num_new_tokens
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Takes a finished or aborted sequence out of its queue and frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.block_table)
