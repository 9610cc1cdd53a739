"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Every step fills one batch under a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``). The unit of queueing and preemption is the request, with all its sequences
(its ``n`` samples or its beams, which share blocks and must advance together). Running
requests go first, in arrival order: each sequence asks for all the tokens it has not computed
yet (one for a decode, the rest of a prompt for a prefill), cut to the budget left (chunked
prefill). Waiting requests then join first come, first served while budget, cap and free blocks
allow (one whose LoRA adapter would make more than ``max_loras`` adapters in the step is passed
over, and only base-model requests go ahead of it); a joining sequence first takes its longest
cached prefix from the block manager, and a request whose next prefix block is being computed
by another request right now waits one step to find it cached instead of computing it again
(vLLM would compute it twice). When a running sequence cannot get a block, the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (mostly from the prefix cache). Under a sliding window (every layer of the model
attends over at most W trailing tokens) a sequence's blocks wholly before its window are
released before each of its steps.

With speculative decoding, budget and free blocks left once everyone has been scheduled go to
draft tokens: a greedy request's decode also computes the tokens its n-gram proposer guesses
will follow, so one step can check them all. Drafts never preempt and never displace a waiting
request; after the step the drafts that were rejected give their blocks back (``accept``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedserve.config import EngineConfig
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.ngram_proposer import NgramProposer
from pagedserve.engine.sequence import Request, Sequence, SequenceStatus
from pagedserve.model.batch import ModelInput, SeqChunk


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # the drafts included
    # Guesses of the tokens after the sequence's last one, computed with it to be checked.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def num_known_tokens(self) -> int:
        """The sequence's own tokens among those computed: all but the drafts."""
        return self.num_new_tokens - len(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    """One step's batch: decodes (one new token) first, shortest context first (the attention
    groups decodes of similar length), then prefill chunks and decodes with drafts; and the
    block copies
    (copy-on-write) to make before the step's attention."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # The runner's share: a snapshot of what runs, taken when the step was scheduled.
    model_input: ModelInput = field(default_factory=ModelInput)

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
    num_decoded_tokens: int = 0  # decodes' tokens, drafts included


def _chunk(item: ScheduledSeq) -> SeqChunk:
    seq, start = item.seq, item.seq.num_computed_tokens
    end = start + item.num_known_tokens
    wanted = 1 + len(item.draft_token_ids) if end == seq.num_tokens else 0
    request = seq.request
    top, first, targets = None, 0, []
    if request.computes_prompt_logprobs:
        # Position p's row predicts token p + 1: the rows of prompt positions whose next
        # token's logprob is not known yet (a preempted prompt computes its rows again).
        known = max(len(request.prompt_logprobs), 1)
        first = min(max(known - 1 - start, 0), end - start)
        stop = min(end, seq.num_prompt_tokens - 1)
        targets = seq.token_ids[start + first + 1: stop + 1]
        top = request.params.prompt_logprobs
    return SeqChunk(seq.seq_id, seq.token_ids[start:end] + item.draft_token_ids, start,
                    list(seq.block_table.blocks), wanted, top, first, targets, request.lora_id)


def _batch_order(item: ScheduledSeq) -> tuple[bool, int]:
    """Decodes first, shortest context first; prefill chunks after, in their order (stable)."""
    is_decode = item.num_new_tokens == 1
    return not is_decode, item.seq.num_computed_tokens if is_decode else 0


class Scheduler:
    """Owns the waiting and running queues (of requests) and the block manager."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 sliding_window: int | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.sliding_window = sliding_window
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        spec = config.speculative_config
        self.proposer = None if spec is None else NgramProposer(spec.min_n, spec.max_n)
        self.num_speculative_tokens = 0 if spec is None else spec.num_speculative_tokens

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            taken = self._schedule_running(request, budget, out)
            if taken is None:  # the request itself was preempted
                break
            budget -= taken
            i += 1
        # Admitting new work right after preempting would only thrash the cache.
        width = sum(r.params.num_seqs for r in self.running)
        in_flight: set[bytes] | None = None
        # At most max_loras adapters in a step (vLLM's rule): a waiting request whose adapter
        # would be one too many is passed over. Behind it only base-model requests go ahead,
        # so the running adapters drain and its turn comes (vLLM's lets later requests of the
        # running adapters go ahead too, which can starve it for good).
        loras = {r.lora_id for r in self.running if r.lora_id}
        passed = 0
        while len(self.waiting) > passed and budget > 0 and not out.preempted:
            request = self.waiting[passed]
            if width + request.params.num_seqs > self.config.max_num_seqs:
                break
            lora = request.lora_id
            if lora and (passed or (lora not in loras and len(loras) >= self.config.max_loras)):
                passed += 1
                continue
            if in_flight is None and self.block_manager.enable_prefix_caching:
                in_flight = {key for r in self.running for key in self._pending_keys(r)}
            admitted = self._admit(request, budget, in_flight)
            if admitted is None:
                break
            if in_flight is not None:
                in_flight.update(self._pending_keys(request))
            del self.waiting[passed]
            self.running.append(request)
            if lora:
                loras.add(lora)
            width += request.params.num_seqs
            for seq in request.live_seqs:
                seq.status = SequenceStatus.RUNNING
            out.scheduled.extend(admitted)
            budget -= sum(s.num_new_tokens for s in admitted)
        if self.proposer is not None and budget > 0 and not out.preempted:
            self._add_drafts(out.scheduled, budget, self.proposer)
        out.scheduled.sort(key=_batch_order)
        out.block_copies = self.block_manager.take_copies()
        for s in out.scheduled:
            if s.num_known_tokens == 1 and s.seq.num_computed_tokens >= s.seq.num_prompt_tokens:
                out.num_decode_tokens += s.num_new_tokens
            else:
                out.num_prefill_tokens += s.num_new_tokens
        self.stats.num_decoded_tokens += out.num_decode_tokens
        self.stats.num_prefilled_tokens += out.num_prefill_tokens
        adapters = {s.seq.request.lora_id: s.seq.request.lora_request for s in out.scheduled
                    if s.seq.request.lora_request is not None}
        out.model_input = ModelInput([_chunk(s) for s in out.scheduled], out.block_copies,
                                     adapters)
        return out

    def _schedule_running(self, request: Request, budget: int, out: SchedulerOutput
                          ) -> int | None:
        """Schedules what the request's sequences can run; the tokens taken, or ``None`` if
        making room preempted the request itself."""
        bm = self.block_manager
        taken = 0
        for seq in request.live_seqs:
            self._take_cached_prefix(seq)
            self._release_outside_window(seq)
            n = min(seq.num_uncomputed_tokens, budget - taken)
            if n == 0:  # done for this step (a beam waiting for its siblings), or no budget
                continue
            while not bm.allocate(seq.block_table, seq.num_computed_tokens + n,
                                  seq.num_computed_tokens):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    return None
            out.scheduled.append(ScheduledSeq(seq, n))
            taken += n
        return taken

    def _add_drafts(self, scheduled: list[ScheduledSeq], budget: int,
                    proposer: NgramProposer) -> None:
        """Gives the step's greedy single-sequence decodes draft tokens, as many as budget,
        free blocks and the request's remaining length allow."""
        bm = self.block_manager
        for item in scheduled:
            seq = item.seq
            params = seq.params
            if (budget <= 0 or item.num_new_tokens != 1 or seq.num_uncomputed_tokens != 1
                    or seq.num_computed_tokens < seq.num_prompt_tokens
                    or not params.is_greedy or params.num_seqs != 1):
                continue
            # The drafts and the token after them must fit the request's length limits.
            room = seq.request.max_model_len - seq.num_tokens
            if params.max_tokens is not None:
                room = min(room, params.max_tokens - seq.num_output_tokens)
            drafts = proposer.propose(seq.token_ids,
                                      min(self.num_speculative_tokens, budget, room - 1))
            if drafts and not bm.allocate(seq.block_table,
                                          seq.num_computed_tokens + 1 + len(drafts),
                                          seq.num_computed_tokens):
                # No free blocks: only the drafts that the sequence's last block has room for.
                drafts = drafts[:len(seq.block_table) * bm.block_size
                                - seq.num_computed_tokens - 1]
            if drafts:
                item.draft_token_ids = drafts
                item.num_new_tokens += len(drafts)
                budget -= len(drafts)

    def _pending_keys(self, request: Request) -> list[bytes]:
        """Prefix keys of the blocks the request's prefills are about to fill."""
        bs = self.block_manager.block_size
        return [key for seq in request.live_seqs if seq.num_uncomputed_tokens >= bs
                for key in self.block_manager.pending_keys(seq.block_table, seq.token_ids)]

    def _admit(self, request: Request, budget: int, in_flight: set[bytes] | None
               ) -> list[ScheduledSeq] | None:
        """Allocates for a waiting request's sequences, all or nothing; ``None`` when it must
        wait (no room, or its prefix is being computed by another request)."""
        bm = self.block_manager
        admitted: list[ScheduledSeq] = []
        for seq in request.live_seqs:
            self._take_cached_prefix(seq)
            if seq.num_preemptions == 0:
                request.num_cached_tokens = seq.num_computed_tokens
            if in_flight and bm.next_key(seq.block_table, seq.token_ids) in in_flight:
                for s in request.live_seqs:
                    bm.free(s.block_table)
                    s.num_computed_tokens = 0
                return None
            self._release_outside_window(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            # Without chunked prefill a sequence waits for a step with room for all of it,
            # unless it could never fit whole (a preempted one that outgrew the budget).
            too_big = (n < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill
                       and seq.num_uncomputed_tokens <= self.config.max_num_batched_tokens)
            if too_big or not bm.allocate(seq.block_table, seq.num_computed_tokens + n,
                                          seq.num_computed_tokens):
                for s in request.live_seqs:
                    bm.free(s.block_table)
                    s.num_computed_tokens = 0
                return None
            if n:
                admitted.append(ScheduledSeq(seq, n))
                budget -= n
        return admitted

    def _take_cached_prefix(self, seq: Sequence) -> None:
        if (seq.num_computed_tokens == 0 and not seq.block_table.blocks
                and not seq.request.computes_prompt_logprobs):
            seq.block_table = self.block_manager.match_prefix(seq.token_ids,
                                                              seq.request.prefix_root)
            seq.num_computed_tokens = len(seq.block_table) * self.block_manager.block_size

    def _release_outside_window(self, seq: Sequence) -> None:
        """Frees the blocks no query of the sequence will read again: its next token, at
        position ``num_computed_tokens``, sees positions from ``num_computed_tokens - W + 1``."""
        if self.sliding_window is not None:
            self.block_manager.release_before(
                seq.block_table, seq.num_computed_tokens - self.sliding_window + 1)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        victims = set(request.live_seqs)
        out.scheduled = [s for s in out.scheduled if s.seq not in victims]
        for seq in request.live_seqs:
            self.block_manager.free(seq.block_table)
            seq.num_computed_tokens = 0
            seq.num_preemptions += 1
            seq.status = SequenceStatus.WAITING
            out.preempted.append(seq)
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1

    def commit(self, batch: SchedulerOutput) -> None:
        """Records that the batch ran: its tokens are in the cache (and the prefix cache).
        Drafts count once accepted (``accept``)."""
        for item in batch.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_known_tokens
            self.block_manager.commit(seq.block_table, seq.token_ids, seq.num_computed_tokens)

    def accept(self, seq: Sequence, num_accepted: int) -> None:
        """Records that the first ``num_accepted`` drafts computed for a sequence in the last
        step were right (they are its next tokens now): their K/V is in the cache. The blocks
        that held only rejected drafts return to the pool; the entries rejected drafts left in
        a kept block lie past the sequence's computed tokens, where no attention reads and
        the next steps write."""
        seq.num_computed_tokens += num_accepted
        self.block_manager.commit(seq.block_table, seq.token_ids, seq.num_computed_tokens)
        self.block_manager.trim(seq.block_table, seq.num_computed_tokens)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Makes ``child`` (a copy of ``parent``'s tokens) share the parent's blocks."""
        child.block_table = self.block_manager.fork(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = parent.status

    def finish(self, seq: Sequence) -> None:
        """Ends a finished, aborted or dropped sequence and frees its blocks; a request whose
        sequences have all ended leaves its queue."""
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.block_table)
        request = seq.request
        if not request.live_seqs:
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
