"""Scheduler unit tests: real BlockManager, Sequence and Request objects, no model.

``_Sim`` plays the engine: after each ``schedule()`` it advances ``num_computed_tokens`` by the
scheduled amount and appends a (fake) sampled token to every sequence that has computed all its
tokens, just as ``EngineCore.step`` does with the runner's logits.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.config import EngineConfig
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.sequence import Request, Sequence, SequenceStatus
from pagedserve.kernels.attention import NULL_BLOCK
from pagedserve.sampling_params import SamplingParams


class _StubTokenizer:
    """The scheduler never detokenizes; a Sequence just needs a detokenizer object."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(0x41 + i % 26) for i in ids)


_TOKENIZER = _StubTokenizer()
_ids = itertools.count()


def make_seq(prompt_len: int, name: str | None = None) -> Sequence:
    arrival = next(_ids)
    prompt = [(arrival + i) % 1000 + 3 for i in range(prompt_len)]
    request = Request(name or f"r{arrival}", None, prompt, SamplingParams(max_tokens=None),
                      arrival, max_model_len=10_000)
    seq = Sequence(seq_id=arrival, request=request, index=0, token_ids=list(prompt),
                   num_prompt_tokens=prompt_len,
                   detokenizer=IncrementalDetokenizer(_TOKENIZER, prompt))  # type: ignore[arg-type]
    request.seqs.append(seq)
    return seq


def make_scheduler(num_blocks: int = 1000, block_size: int = 4, budget: int = 64,
                   max_num_seqs: int = 16, chunked: bool = True, caching: bool = True
                   ) -> Scheduler:
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=budget,
                          max_num_seqs=max_num_seqs, enable_chunked_prefill=chunked,
                          enable_prefix_caching=caching)
    return Scheduler(config, BlockManager(num_blocks, block_size, caching))


def waiting_seqs(sched: Scheduler) -> list[Sequence]:
    return [s for r in sched.waiting for s in r.live_seqs]


def running_seqs(sched: Scheduler) -> list[Sequence]:
    return [s for r in sched.running for s in r.live_seqs]


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg, bm = sched.config, sched.block_manager
    assert out.num_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    assert len(out.scheduled) <= cfg.max_num_seqs
    scheduled = [s.seq for s in out.scheduled]
    assert len(scheduled) == len(set(map(id, scheduled))), "a sequence scheduled twice"
    running_ids = {id(s) for s in running_seqs(sched)}
    for item in out.scheduled:
        seq = item.seq
        assert id(seq) in running_ids
        assert seq.status is SequenceStatus.RUNNING
        assert 1 <= item.num_new_tokens <= seq.num_uncomputed_tokens
        # Blocks for every token that will be in the cache after this step.
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + item.num_new_tokens
    for seq in waiting_seqs(sched):
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table.blocks == []
        assert seq.num_computed_tokens == 0
    for seq in out.preempted:
        assert seq in waiting_seqs(sched)
        assert id(seq) not in {id(s) for s in scheduled}
    # Decodes (one new token) come before any multi-token prefill chunk.
    ones = [s.num_new_tokens == 1 for s in out.scheduled]
    assert ones == sorted(ones, reverse=True)
    # Block accounting: exactly the running sequences hold blocks.
    held = [b for s in running_seqs(sched) for b in s.block_table.blocks]
    assert len(held) == len(set(held))
    assert NULL_BLOCK not in held
    assert bm.num_used_blocks == len(held)


class _Sim:
    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.steps: list[SchedulerOutput] = []
        self.admitted: list[Sequence] = []  # in order of first admission

    def step(self) -> SchedulerOutput:
        sched = self.sched
        waiting_before = waiting_seqs(sched)
        out = sched.schedule()
        check_invariants(sched, out)
        newly = [s for s in waiting_before if s.status is SequenceStatus.RUNNING]
        # FCFS: the admitted ones are a prefix of the queue as it stood before the step.
        assert newly == waiting_before[: len(newly)]
        if newly:
            assert not out.preempted, "admission right after a preemption"
        for seq in newly:
            if seq not in self.admitted:
                self.admitted.append(seq)
        sched.commit(out)
        for item in out.scheduled:
            seq = item.seq
            assert seq.num_computed_tokens <= seq.num_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
        self.steps.append(out)
        return out

    def finish_done(self, max_output: int) -> None:
        for seq in running_seqs(self.sched):
            if seq.num_output_tokens >= max_output:
                self.sched.finish(seq)


# ---- budget, cap, FCFS ---------------------------------------------------------------------


def test_token_budget_and_seq_cap_respected_over_a_run():
    sched = make_scheduler(budget=40, max_num_seqs=3)
    seqs = [make_seq(n) for n in (5, 30, 70, 2, 41, 12, 9, 100)]
    for s in seqs:
        sched.add(s.request)
    sim = _Sim(sched)
    for _ in range(500):
        if not sched.has_work:
            break
        out = sim.step()
        assert out.num_tokens <= 40
        assert len(out.scheduled) <= 3
        assert len(sched.running) <= 3
        sim.finish_done(max_output=5)
    assert not sched.has_work
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert all(s.num_output_tokens == 5 for s in seqs)
    # Nobody was ever preempted here, so first admission follows arrival exactly.
    assert sim.admitted == seqs
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_usable_blocks
    # The budget was actually used: some step was full.
    assert max(o.num_tokens for o in sim.steps) == 40


def test_max_num_seqs_caps_admission():
    sched = make_scheduler(budget=1000, max_num_seqs=2)
    seqs = [make_seq(3) for _ in range(5)]
    for s in seqs:
        sched.add(s.request)
    sim = _Sim(sched)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(seqs[0], 3), (seqs[1], 3)]
    assert waiting_seqs(sched) == seqs[2:]
    assert all(s.status is SequenceStatus.WAITING for s in seqs[2:])
    out = sim.step()  # still full: only the two decodes
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(seqs[0], 1), (seqs[1], 1)]
    sched.finish(seqs[0])
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(seqs[1], 1), (seqs[2], 3)]
    assert waiting_seqs(sched) == seqs[3:]


def test_fcfs_blocked_head_blocks_later_requests():
    # The head does not fit the remaining blocks; a later, smaller one must not jump ahead.
    sched = make_scheduler(num_blocks=11, block_size=4, budget=1000)  # 10 usable blocks
    first, big, small = make_seq(24), make_seq(20), make_seq(2)  # 6, 5 and 1 blocks
    for s in (first, big, small):
        sched.add(s.request)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [first]
    assert waiting_seqs(sched) == [big, small]
    assert small.block_table.blocks == []


def test_fcfs_blocked_head_without_chunking():
    sched = make_scheduler(budget=10, chunked=False)
    a, b, c = make_seq(6), make_seq(8), make_seq(3)
    for s in (a, b, c):
        sched.add(s.request)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 6)]
    assert waiting_seqs(sched) == [b, c]  # c (3 tokens) would fit but must wait behind b


# ---- chunked prefill -----------------------------------------------------------------------


def test_chunked_prefill_splits_long_prompt():
    sched = make_scheduler(budget=32)
    seq = make_seq(100)
    sched.add(seq.request)
    sim = _Sim(sched)
    chunks = [sim.step().scheduled[0].num_new_tokens for _ in range(4)]
    assert chunks == [32, 32, 32, 4]
    assert seq.num_computed_tokens == 100
    assert seq.num_output_tokens == 1  # sampled only after the last chunk
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(seq, 1)]
    assert sched.stats.num_prefilled_tokens == 100
    assert sched.stats.num_decoded_tokens == 1


def test_chunked_prefill_shares_budget_with_decodes():
    sched = make_scheduler(budget=16)
    a = make_seq(4)
    sched.add(a.request)
    sim = _Sim(sched)
    sim.step()  # a prefilled, one token sampled
    b = make_seq(40)
    sched.add(b.request)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 15)]
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 15)]
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 10)]
    assert b.num_computed_tokens == 40
    assert b.num_output_tokens == 1


def test_without_chunked_prefill_prompt_waits_for_budget():
    sched = make_scheduler(budget=32, chunked=False)
    a, b = make_seq(20), make_seq(20)
    sched.add(a.request)
    sched.add(b.request)
    sim = _Sim(sched)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 20)]
    assert waiting_seqs(sched) == [b]
    assert b.num_computed_tokens == 0
    out = sim.step()  # a decodes one token, 31 left: b fits whole
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 20)]


def test_without_chunked_prefill_prompt_never_split():
    sched = make_scheduler(budget=32, chunked=False)
    a, b = make_seq(10), make_seq(32)
    sched.add(a.request)
    sched.add(b.request)
    sim = _Sim(sched)
    for _ in range(5):
        out = sim.step()
        for item in out.scheduled:
            if item.seq is b:
                pytest.fail("b can never fit whole while a decodes")
    assert b.num_computed_tokens == 0
    sched.finish(a)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 32)]


# ---- ordering --------------------------------------------------------------------------------


def test_decodes_come_first():
    sched = make_scheduler(budget=64)
    long_prompt = make_seq(100)  # running, still prefilling in chunks
    sched.add(long_prompt.request)
    sim = _Sim(sched)
    sim.step()
    assert long_prompt.num_computed_tokens == 64
    decoder = make_seq(3)
    sched.add(decoder.request)
    out = sim.step()  # long_prompt finishes its prompt with 36, decoder admitted with 3
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(long_prompt, 36), (decoder, 3)]
    late = make_seq(10)
    sched.add(late.request)
    out = sim.step()
    # Both decode now, the shorter context first; then the new prefill.
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [
        (decoder, 1), (long_prompt, 1), (late, 10)]
    # A one-token prefill chunk counts as a decode and is listed before a longer chunk.
    sched2 = make_scheduler(budget=20)
    sim2 = _Sim(sched2)
    early = make_seq(2)
    sched2.add(early.request)
    sim2.step()
    big = make_seq(50)
    sched2.add(big.request)
    sim2.step()  # early decodes, big gets 19
    sched2.finish(early)
    after = make_seq(1)
    sched2.add(after.request)
    out = sim2.step()  # big continues with 20; after is not admitted (budget used up)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(big, 20)]
    out = sim2.step()  # big 11 more, after admitted with its single prompt token
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(after, 1), (big, 11)]


def test_decode_listed_before_earlier_multi_token_sequence():
    sched = make_scheduler(budget=64)
    a, b, c = make_seq(3), make_seq(3), make_seq(3)
    for s in (a, b, c):
        sched.add(s.request)
    sim = _Sim(sched)
    sim.step()
    # a (oldest, first in running) has several uncomputed tokens, as after accepting more
    # than one token at once; b and c have one each.
    a.token_ids.extend([5, 6, 7])
    out = sim.step()
    assert running_seqs(sched) == [a, b, c]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 1), (c, 1), (a, 4)]


# ---- preemption ------------------------------------------------------------------------------


def test_newest_running_sequence_is_preempted():
    # block_size 4, 6 usable blocks. Three sequences of 8 tokens take 2 blocks each.
    sched = make_scheduler(num_blocks=7, block_size=4, budget=100)
    a, b, c = make_seq(8), make_seq(8), make_seq(8)
    for s in (a, b, c):
        sched.add(s.request)
    sim = _Sim(sched)
    out = sim.step()
    assert [s.seq for s in out.scheduled] == [a, b, c]
    assert sched.block_manager.num_free_blocks == 0
    c_blocks = list(c.block_table.blocks)
    # Each now has 9 tokens and needs a third block for its decode: a's request preempts c.
    out = sim.step()
    assert out.preempted == [c]
    assert c.block_table.blocks == []
    assert c.num_computed_tokens == 0
    assert c.num_preemptions == 1
    assert c.status is SequenceStatus.WAITING
    assert waiting_seqs(sched) == [c]
    assert running_seqs(sched) == [a, b]
    assert all(sched.block_manager.ref_counts[blk] == 0 or blk in a.block_table.blocks
               or blk in b.block_table.blocks for blk in c_blocks)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 1)]
    assert len(a.block_table) == len(b.block_table) == 3
    assert sched.stats.num_preemptions == 1
    # The older ones keep decoding; c waits at the front (nothing frees up until one ends).
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 1)]
    assert waiting_seqs(sched) == [c]
    # When a finishes, c comes back and recomputes prompt plus its output so far.
    sched.finish(a)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 1), (c, 9)]
    assert c.status is SequenceStatus.RUNNING


def test_preempted_goes_to_front_of_waiting():
    sched = make_scheduler(num_blocks=5, block_size=4, budget=100, max_num_seqs=2)
    a, b, c = make_seq(8), make_seq(8), make_seq(4)
    for s in (a, b, c):
        sched.add(s.request)
    sim = _Sim(sched)
    sim.step()  # a, b admitted (4 blocks, pool full); c waits on the seq cap
    assert waiting_seqs(sched) == [c]
    out = sim.step()  # a needs a block: b (newest) is preempted, ahead of c
    assert out.preempted == [b]
    assert waiting_seqs(sched) == [b, c]
    assert running_seqs(sched) == [a]


def test_several_preemptions_keep_arrival_order():
    # 4 usable blocks of size 4; four 2-token sequences hold one block each.
    sched = make_scheduler(num_blocks=5, block_size=4, budget=100)
    seqs = [make_seq(2) for _ in range(4)]
    for s in seqs:
        sched.add(s.request)
    sim = _Sim(sched)
    sim.step()
    # Give the oldest a longer history so it needs two more blocks at once; the others'
    # decodes still fit their one block.
    a = seqs[0]
    a.token_ids.extend([9] * 6)  # 9 tokens, 2 computed: needs 3 blocks
    out = sim.step()
    assert out.preempted == [seqs[3], seqs[2]]
    assert waiting_seqs(sched) == [seqs[2], seqs[3]]
    assert running_seqs(sched) == seqs[:2]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(seqs[1], 1), (a, 7)]
    assert sched.stats.num_preemptions == 2


def test_sequence_preempts_itself_when_alone_is_too_much():
    # The last running sequence cannot grow: it preempts itself and nothing is admitted.
    sched = make_scheduler(num_blocks=3, block_size=2, budget=100)  # 2 usable blocks
    a, b = make_seq(2), make_seq(2)
    sched.add(a.request)
    sched.add(b.request)
    sim = _Sim(sched)
    sim.step()
    b.token_ids.extend([9, 9])  # b needs 2 blocks now, a holds the other
    out = sim.step()
    assert out.preempted == [b]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1)]
    assert waiting_seqs(sched) == [b]


# ---- finish ----------------------------------------------------------------------------------


def test_finish_running_frees_blocks():
    sched = make_scheduler()
    a, b = make_seq(10), make_seq(10)
    sched.add(a.request)
    sched.add(b.request)
    sched.schedule()
    bm = sched.block_manager
    used = bm.num_used_blocks
    a_blocks = list(a.block_table.blocks)
    assert a_blocks
    sched.finish(a)
    assert a.status is SequenceStatus.FINISHED
    assert a.is_finished
    assert a.block_table.blocks == []
    assert running_seqs(sched) == [b]
    assert bm.num_used_blocks == used - len(a_blocks)
    assert all(bm.ref_counts[blk] == 0 for blk in a_blocks)
    sched.finish(b)
    assert not sched.has_work
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_finish_waiting_removes_it():
    sched = make_scheduler(max_num_seqs=1)
    a, b, c = make_seq(4), make_seq(4), make_seq(4)
    for s in (a, b, c):
        sched.add(s.request)
    sched.schedule()
    sched.finish(b)
    assert b.status is SequenceStatus.FINISHED
    assert waiting_seqs(sched) == [c]
    sched.finish(a)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [c]


def test_finish_partially_prefilled_sequence_frees_blocks():
    sched = make_scheduler(budget=8)
    seq = make_seq(30)
    sched.add(seq.request)
    _Sim(sched).step()
    assert seq.block_table and seq.num_computed_tokens == 8
    sched.finish(seq)
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert all(c == 0 for c in bm.ref_counts)


def test_empty_schedule():
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty
    assert out.num_tokens == 0
    assert not sched.has_work


# ---- a random workload -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.integers(1, 60), min_size=1, max_size=12),
       outputs=st.data(),
       num_blocks=st.integers(17, 60), block_size=st.sampled_from([1, 2, 4, 8]),
       budget=st.integers(16, 80), max_num_seqs=st.integers(1, 6), chunked=st.booleans(),
       arrive_every=st.integers(0, 3))
def test_random_workload(prompts, outputs, num_blocks, block_size, budget, max_num_seqs,
                         chunked, arrive_every):
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=budget,
                           max_num_seqs=max_num_seqs, chunked=chunked)
    usable_tokens = (num_blocks - 1) * block_size
    # Like EngineCore.make_request: prompt plus output must fit the cache (and, unchunked,
    # the whole sequence must fit the budget so that a recompute after preemption can run).
    cap = min(usable_tokens, budget if not chunked else usable_tokens)
    seqs, lengths = [], []
    for p in prompts:
        p = min(p, cap - 1)
        seqs.append(make_seq(p))
        lengths.append(outputs.draw(st.integers(1, cap - p)))
    sim = _Sim(sched)
    pending = list(seqs)
    for step in range(3000):
        if pending and (arrive_every == 0 or step % arrive_every == 0):
            sched.add(pending.pop(0).request)
        if not sched.has_work and not pending:
            break
        sim.step()
        for seq, n in zip(seqs, lengths):
            if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= n:
                sched.finish(seq)
    else:
        pytest.fail("the workload did not finish")
    assert all(s.num_output_tokens == n for s, n in zip(seqs, lengths))
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_usable_blocks
    assert all(c == 0 for c in sched.block_manager.ref_counts)
    assert sched.stats.num_decoded_tokens + sched.stats.num_prefilled_tokens == sum(
        o.num_tokens for o in sim.steps)


# ---- known bug -------------------------------------------------------------------------------


def test_unchunked_recompute_longer_than_budget_is_readmitted():
    # make_request only checks the *prompt* against max_num_batched_tokens; prompt plus
    # output can outgrow it, and a preempted sequence must recompute all of it in one step.
    sched = make_scheduler(num_blocks=11, block_size=1, budget=8, chunked=False, caching=False)
    a, b = make_seq(1), make_seq(7)
    sched.add(a.request)
    sched.add(b.request)
    sim = _Sim(sched)
    sim.step()  # 8 tokens: both admitted
    sim.step()  # a: 2 tokens, b: 8 tokens -> 10 blocks, the pool is full
    out = sim.step()
    assert out.preempted == [b]
    assert b.num_tokens == 9 > sched.config.max_num_batched_tokens
    sched.finish(a)
    for _ in range(3):
        out = sim.step()
        if out.scheduled:
            break
    # It is chunked although chunking is off: otherwise it would wait forever.
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 8)]
