"""BlockManager: a stateful hypothesis model of sequences that allocate, append, fork (with
copy-on-write), hit the prefix cache, get evicted, preempted and aborted; plus unit tests.

The machine simulates the KV cache's *contents*: each block holds the token ids written to its
slots, copies are performed as the model runner would, and after every step each sequence must
read exactly its own tokens back from its blocks. That is the property sharing must never break.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagedserve.engine.block_manager import BlockManager, BlockTable, block_key
from pagedserve.kernels.attention import NULL_BLOCK

MAX_SEQS = 5
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)  # few symbols: many shared prefixes


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Seq:
    def __init__(self, tokens: list[int], table: BlockTable) -> None:
        self.tokens = tokens
        self.table = table
        self.computed = 0  # tokens whose K/V are in the cache
        self.preempted = False


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(min_value=2, max_value=20),
                block_size=st.sampled_from([1, 2, 4]), caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.seqs: list[_Seq] = []
        self.content: dict[int, list[int | None]] = {}  # block -> token id in each slot

    # ---- what the scheduler and the runner do ------------------------------------------------

    def _compute(self, seq: _Seq) -> bool:
        """Allocates for the uncomputed tokens, performs copies, writes them, commits."""
        bm = self.bm
        free_before = bm.num_free_blocks
        refs_before = list(bm.ref_counts)
        shared = sum(1 for i in range(seq.computed // bm.block_size, len(seq.table))
                     if bm.ref_counts[seq.table.blocks[i]] > 1)
        needed = bm.blocks_needed(seq.table, len(seq.tokens)) + shared
        if not bm.allocate(seq.table, len(seq.tokens), seq.computed):
            assert needed > free_before
            assert bm.ref_counts == refs_before, "a failed allocate must change nothing"
            return False
        assert bm.num_free_blocks == free_before - needed
        for src, dst in bm.take_copies():
            assert bm.ref_counts[dst] == 1 and bm.ref_counts[src] >= 1
            self.content[dst] = list(self.content[src])
        for pos in range(seq.computed, len(seq.tokens)):
            block = seq.table.blocks[pos // bm.block_size]
            # Writing into a block another sequence references would corrupt it.
            assert bm.ref_counts[block] == 1, f"write into shared block {block}"
            slots = self.content.setdefault(block, [None] * bm.block_size)
            slots[pos % bm.block_size] = seq.tokens[pos]
        seq.computed = len(seq.tokens)
        bm.commit(seq.table, seq.tokens, seq.computed)
        return True

    def _admit(self, seq: _Seq) -> None:
        seq.table = self.bm.match_prefix(seq.tokens)
        seq.computed = len(seq.table) * self.bm.block_size
        assert seq.computed < len(seq.tokens) or not seq.tokens
        if self._compute(seq):
            seq.preempted = False
        else:
            self._preempt(seq)

    def _preempt(self, seq: _Seq) -> None:
        self.bm.free(seq.table)
        seq.computed = 0
        seq.preempted = True

    # ---- rules --------------------------------------------------------------------------------

    @precondition(lambda self: len(self.seqs) < MAX_SEQS)
    @rule(tokens=TOKENS)
    def new_sequence(self, tokens: list[int]) -> None:
        seq = _Seq(list(tokens), BlockTable())
        self.seqs.append(seq)
        self._admit(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), tokens=TOKENS)
    def extend(self, data: st.DataObject, tokens: list[int]) -> None:
        """Appends decoded tokens (or a longer request reusing an earlier one's prefix)."""
        seq = data.draw(st.sampled_from(self.seqs))
        seq.tokens += tokens[:3]
        if seq.preempted:
            self._admit(seq)
        elif not self._compute(seq):
            self._preempt(seq)

    @precondition(lambda self: self.seqs and len(self.seqs) < MAX_SEQS)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from([s for s in self.seqs if not s.preempted] or [None]))
        if parent is None:
            return
        child = _Seq(list(parent.tokens), self.bm.fork(parent.table))
        child.computed = parent.computed
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt(data.draw(st.sampled_from(self.seqs)))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish_or_abort(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        self.bm.free(seq.table)
        self.seqs.remove(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def readmit(self, data: st.DataObject) -> None:
        waiting = [s for s in self.seqs if s.preempted]
        if waiting:
            self._admit(data.draw(st.sampled_from(waiting)))

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def reference_counts_are_exact(self) -> None:
        bm = self.bm
        expected = [0] * bm.num_blocks
        for seq in self.seqs:
            assert len(seq.table.blocks) == len(set(seq.table.blocks))
            for block in seq.table.blocks:
                expected[block] += 1
        assert bm.ref_counts == expected
        assert expected[NULL_BLOCK] == 0
        free = set(bm._free) | set(bm._evictable)
        assert len(free) == bm.num_free_blocks, "a block is free twice"
        assert NULL_BLOCK not in free
        for block in range(bm.num_blocks):
            if block != NULL_BLOCK:
                assert (block in free) == (expected[block] == 0), f"block {block}"
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_usable_blocks
        assert bm.num_shared_blocks == sum(1 for c in expected if c > 1)

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        bs = self.bm.block_size
        for seq in self.seqs:
            if seq.preempted:
                assert not seq.table.blocks
                continue
            assert len(seq.table) == _ceil_div(seq.computed, bs)
            for pos in range(seq.computed):
                block = seq.table.blocks[pos // bs]
                assert self.content[block][pos % bs] == seq.tokens[pos]

    @invariant()
    def cached_blocks_hold_their_prefix(self) -> None:
        bm = self.bm
        for key, block in bm._cached.items():
            tokens = bm._tokens_of[block]
            assert len(tokens) == bm.block_size
            assert self.content[block] == list(tokens)
            assert bm._key_of[block] == key
        if not bm.enable_prefix_caching:
            assert not bm._cached

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq in self.seqs:
            self.bm.free(seq.table)
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks
        assert all(c == 0 for c in self.bm.ref_counts)


BlockManagerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40,
                                                 deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


# ---- prefix cache, fork and copy-on-write ------------------------------------------------------


def _run(bm: BlockManager, tokens: list[int]) -> BlockTable:
    table = bm.match_prefix(tokens)
    assert bm.allocate(table, len(tokens), len(table) * bm.block_size)
    bm.commit(table, tokens, len(tokens))
    return table


def test_prefix_hit_takes_the_cached_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _run(bm, list(range(10)))  # blocks: [0-3] [4-7] [8,9]
    b = bm.match_prefix([*range(9), 99])
    assert b.blocks == a.blocks[:2]
    assert bm.stats.prefix_hit_tokens == 8
    assert all(bm.ref_counts[blk] == 2 for blk in b.blocks)
    assert b.keys == a.keys[:2]


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _run(bm, list(range(8)))
    bm.free(a)
    assert len(bm.match_prefix(list(range(8)))) == 1  # 7 tokens may come from the cache
    assert len(bm.match_prefix(list(range(9)))) == 2


def test_reset_prefix_cache_only_when_no_block_is_used():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _run(bm, list(range(10)))
    assert not bm.reset_prefix_cache()  # a sequence still holds its blocks
    hit = bm.match_prefix(list(range(10)))
    assert len(hit) == 2  # nothing was forgotten
    bm.free(hit)
    bm.free(a)
    assert bm.num_cached_blocks == 2
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == bm.num_usable_blocks
    assert bm.match_prefix(list(range(10))).blocks == []


def test_different_parent_means_no_hit():
    bm = BlockManager(num_blocks=16, block_size=2)
    _run(bm, [1, 2, 3, 4, 5])
    assert bm.match_prefix([9, 9, 3, 4, 5]).blocks == []  # same second block, other prefix
    assert block_key(b"", [1, 2]) != block_key(b"", [2, 1])


def test_finished_blocks_stay_cached_until_evicted_leaf_first():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    a = _run(bm, [1, 2, 3, 4, 5, 6, 7])  # 4 blocks, 3 full and cached
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 3
    b = BlockTable()
    assert bm.allocate(b, 2, 0)  # takes the uncached partial block first
    assert bm.num_cached_blocks == 3
    assert bm.allocate(b, 4, 2)  # now evicts: the leaf [5, 6] goes before its parents
    assert len(bm.match_prefix([1, 2, 3, 4, 5, 6, 0])) == 2
    assert bm.stats.evictions == 1


def test_fork_then_append_copies_the_shared_partial_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = _run(bm, [1, 2, 3, 4, 5, 6])  # second block holds 2 of 4 tokens
    child = bm.fork(parent)
    assert bm.num_shared_blocks == 2
    assert bm.allocate(child, 7, 6)  # child writes position 6, in the shared block
    assert bm.take_copies() == [(parent.blocks[1], child.blocks[1])]
    assert child.blocks[0] == parent.blocks[0]  # the full block stays shared
    assert bm.ref_counts[parent.blocks[1]] == 1
    assert bm.allocate(parent, 7, 6)  # the parent now owns its block alone: no copy
    assert bm.take_copies() == []
    assert bm.stats.cow_copies == 1


def test_copy_into_a_freed_block_is_dropped():
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = _run(bm, [1, 2, 3, 4, 5, 6])
    child = bm.fork(parent)
    assert bm.allocate(child, 7, 6)
    bm.free(child)  # preempted in the same step
    assert bm.take_copies() == []


def test_caching_off_never_hits():
    bm = BlockManager(num_blocks=16, block_size=2, enable_prefix_caching=False)
    bm.free(_run(bm, [1, 2, 3, 4, 5]))
    assert bm.match_prefix([1, 2, 3, 4, 5]).blocks == []
    assert bm.num_cached_blocks == 0


# ---- plain unit tests --------------------------------------------------------------------------


@pytest.mark.parametrize(("table_len", "num_tokens", "expected"), [
    (0, 0, 0), (0, 1, 1), (0, 16, 1), (0, 17, 2), (0, 32, 2), (0, 33, 3),
    (1, 16, 0), (1, 17, 1), (2, 17, 0), (3, 17, 0), (2, 100, 5), (7, 100, 0),
])
def test_blocks_needed(table_len, num_tokens, expected):
    bm = BlockManager(num_blocks=64, block_size=16)
    assert bm.blocks_needed(BlockTable(list(range(1, table_len + 1))), num_tokens) == expected


@pytest.mark.parametrize("block_size", [1, 2, 8, 16])
def test_blocks_needed_matches_ceil_div(block_size):
    bm = BlockManager(num_blocks=4, block_size=block_size)
    for tokens in range(0, 5 * block_size + 1):
        assert bm.blocks_needed(BlockTable(), tokens) == _ceil_div(tokens, block_size)


def test_initial_state():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_usable_blocks == 7
    assert bm.num_free_blocks == 7
    assert bm.num_used_blocks == 0
    assert bm.ref_counts == [0] * 8


def test_needs_at_least_two_blocks():
    with pytest.raises(ValueError, match="2 blocks"):
        BlockManager(num_blocks=1, block_size=16)
    BlockManager(num_blocks=2, block_size=16)


def test_null_block_never_handed_out():
    bm = BlockManager(num_blocks=5, block_size=1)
    table = BlockTable()
    assert bm.allocate(table, 4, 0)
    assert sorted(table.blocks) == [b for b in range(5) if b != NULL_BLOCK]
    assert bm.ref_counts[NULL_BLOCK] == 0
    assert bm.num_free_blocks == 0


def test_allocate_returns_false_when_out_of_blocks():
    bm = BlockManager(num_blocks=5, block_size=4)  # 4 usable blocks, 16 tokens
    a = BlockTable()
    b = BlockTable()
    assert bm.allocate(a, 12, 0)  # 3 blocks
    assert len(a) == 3
    refs = list(bm.ref_counts)
    assert not bm.allocate(b, 8, 0)  # needs 2, only 1 free: all or nothing
    assert b.blocks == []
    assert bm.ref_counts == refs
    assert bm.num_free_blocks == 1
    assert bm.allocate(b, 4, 0)
    assert len(b) == 1
    assert not bm.allocate(a, 13, 0)
    assert len(a) == 3
    bm.free(a)
    assert bm.allocate(b, 16, 0)
    assert len(b) == 4
    assert bm.num_free_blocks == 0


def test_allocate_within_existing_blocks_needs_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    table = BlockTable()
    assert bm.allocate(table, 5, 0)
    assert bm.num_free_blocks == 0
    for tokens in range(0, 9):  # shrinking or staying within capacity is free
        assert bm.allocate(table, tokens, 0)
    assert len(table) == 2
    assert not bm.allocate(table, 9, 0)


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = BlockTable()
    assert bm.allocate(a, 6, 0)
    first = set(a.blocks)
    bm.free(a)
    assert a.blocks == []
    b = BlockTable()
    assert bm.allocate(b, 6, 0)
    assert set(b.blocks) == first


def test_freeing_twice_is_detected():
    bm = BlockManager(num_blocks=4, block_size=2)
    table = BlockTable()
    assert bm.allocate(table, 4, 0)
    stale = BlockTable(list(table.blocks))
    bm.free(table)
    with pytest.raises(AssertionError, match="freed more often"):
        bm.free(stale)


def test_free_empty_table_is_noop():
    bm = BlockManager(num_blocks=4, block_size=2)
    table = BlockTable()
    bm.free(table)
    assert bm.num_free_blocks == 3
    assert bm.ref_counts == [0] * 4


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), max_size=10), block_size=st.sampled_from([1, 4, 16]))
def test_allocate_until_full(sizes, block_size):
    bm = BlockManager(num_blocks=10, block_size=block_size)
    tables = []
    for size in sizes:
        table = BlockTable()
        need = _ceil_div(size, block_size)
        free = bm.num_free_blocks
        assert bm.allocate(table, size, 0) == (need <= free)
        tables.append(table)
    held = [b for t in tables for b in t.blocks]
    assert len(held) == len(set(held)) == bm.num_used_blocks
    for table in tables:
        bm.free(table)
    assert bm.num_free_blocks == bm.num_usable_blocks
