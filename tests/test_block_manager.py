"""BlockManager: a stateful hypothesis model of allocate / append / free, plus unit tests."""

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

from backend.engine.block_manager import BlockManager
from kernels.attention import NULL_BLOCK

NUM_TABLES = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockManagerMachine(RuleBasedStateMachine):
    """Several block tables grow and shrink; a plain model tracks how many tokens each holds."""

    @initialize(num_blocks=st.integers(min_value=2, max_value=24),
                block_size=st.sampled_from([1, 2, 4, 16]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        self.tables: list[list[int]] = [[] for _ in range(NUM_TABLES)]
        self.tokens = [0] * NUM_TABLES  # tokens each table has been grown to hold

    def _snapshot(self) -> tuple:
        return ([list(t) for t in self.tables], list(self.bm.ref_counts), self.bm.num_free_blocks,
                self.bm.num_used_blocks)

    def _grow(self, i: int, num_tokens: int) -> None:
        table = self.tables[i]
        needed = self.bm.blocks_needed(table, num_tokens)
        assert needed == max(0, _ceil_div(num_tokens, self.bm.block_size) - len(table))
        free_before = self.bm.num_free_blocks
        before = self._snapshot()
        ok = self.bm.allocate(table, num_tokens)
        assert ok == (needed <= free_before)
        if ok:
            assert len(table) == len(before[0][i]) + needed
            assert table[: len(before[0][i])] == before[0][i], "existing blocks must stay put"
            assert self.bm.num_free_blocks == free_before - needed
            assert len(table) * self.bm.block_size >= num_tokens
            self.tokens[i] = max(self.tokens[i], num_tokens)
        else:
            assert self._snapshot() == before, "a failed allocate must change nothing"

    @rule(i=st.integers(0, NUM_TABLES - 1), num_tokens=st.integers(0, 100))
    def allocate(self, i: int, num_tokens: int) -> None:
        self._grow(i, num_tokens)

    @rule(i=st.integers(0, NUM_TABLES - 1), extra=st.integers(0, 40))
    def allocate_more(self, i: int, extra: int) -> None:
        self._grow(i, self.tokens[i] + extra)

    @rule(i=st.integers(0, NUM_TABLES - 1))
    def append(self, i: int) -> None:
        self._grow(i, self.tokens[i] + 1)

    @rule(i=st.integers(0, NUM_TABLES - 1))
    def free(self, i: int) -> None:
        held = list(self.tables[i])
        free_before = self.bm.num_free_blocks
        self.bm.free(self.tables[i])
        assert self.tables[i] == []
        self.tokens[i] = 0
        assert self.bm.num_free_blocks == free_before + len(held)
        assert all(self.bm.ref_counts[b] == 0 for b in held)

    @precondition(lambda self: any(self.tables))
    @rule(data=st.data())
    def free_all_then_reuse(self, data) -> None:
        for i in range(NUM_TABLES):
            self.free(i)
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks
        # Every usable block can be handed out again, to a single table.
        everything = self.bm.num_usable_blocks * self.bm.block_size
        i = data.draw(st.integers(0, NUM_TABLES - 1))
        self._grow(i, everything)
        assert sorted(self.tables[i]) == [
            b for b in range(self.bm.num_blocks) if b != NULL_BLOCK]
        assert not self.bm.allocate(self.tables[(i + 1) % NUM_TABLES], 1)

    @invariant()
    def blocks_are_consistent(self) -> None:
        held = [b for t in self.tables for b in t]
        assert len(held) == len(set(held)), "a block is in two tables or twice in one"
        assert NULL_BLOCK not in held
        assert all(0 <= b < self.bm.num_blocks for b in held)
        held_set = set(held)
        for b, count in enumerate(self.bm.ref_counts):
            assert count == (1 if b in held_set else 0), f"block {b} has ref count {count}"
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == self.bm.num_usable_blocks
        assert self.bm.num_used_blocks == len(held)
        assert self.bm.num_usable_blocks == self.bm.num_blocks - 1

    @invariant()
    def tables_are_minimal(self) -> None:
        # Tables hold exactly enough blocks for the tokens they were grown to.
        for table, tokens in zip(self.tables, self.tokens):
            assert len(table) == _ceil_div(tokens, self.bm.block_size)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for table in self.tables:
            self.bm.free(table)
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks
        assert all(c == 0 for c in self.bm.ref_counts)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                                 deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


# ---- plain unit tests --------------------------------------------------------------------------


@pytest.mark.parametrize(("table_len", "num_tokens", "expected"), [
    (0, 0, 0), (0, 1, 1), (0, 16, 1), (0, 17, 2), (0, 32, 2), (0, 33, 3),
    (1, 16, 0), (1, 17, 1), (2, 17, 0), (3, 17, 0), (2, 100, 5), (7, 100, 0),
])
def test_blocks_needed(table_len, num_tokens, expected):
    bm = BlockManager(num_blocks=64, block_size=16)
    assert bm.blocks_needed(list(range(1, table_len + 1)), num_tokens) == expected


@pytest.mark.parametrize("block_size", [1, 2, 8, 16])
def test_blocks_needed_matches_ceil_div(block_size):
    bm = BlockManager(num_blocks=4, block_size=block_size)
    for tokens in range(0, 5 * block_size + 1):
        assert bm.blocks_needed([], tokens) == _ceil_div(tokens, block_size)


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
    table: list[int] = []
    assert bm.allocate(table, 4)
    assert sorted(table) == [b for b in range(5) if b != NULL_BLOCK]
    assert bm.ref_counts[NULL_BLOCK] == 0
    assert bm.num_free_blocks == 0


def test_allocate_returns_false_when_out_of_blocks():
    bm = BlockManager(num_blocks=5, block_size=4)  # 4 usable blocks, 16 tokens
    a: list[int] = []
    b: list[int] = []
    assert bm.allocate(a, 12)  # 3 blocks
    assert len(a) == 3
    refs = list(bm.ref_counts)
    assert not bm.allocate(b, 8)  # needs 2, only 1 free: all or nothing
    assert b == []
    assert bm.ref_counts == refs
    assert bm.num_free_blocks == 1
    assert bm.allocate(b, 4)
    assert len(b) == 1
    assert not bm.allocate(a, 13)
    assert len(a) == 3
    bm.free(a)
    assert bm.allocate(b, 16)
    assert len(b) == 4
    assert bm.num_free_blocks == 0


def test_allocate_within_existing_blocks_needs_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    table: list[int] = []
    assert bm.allocate(table, 5)
    assert bm.num_free_blocks == 0
    for tokens in range(0, 9):  # shrinking or staying within capacity is free
        assert bm.allocate(table, tokens)
    assert len(table) == 2
    assert not bm.allocate(table, 9)


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a: list[int] = []
    assert bm.allocate(a, 6)
    first = set(a)
    bm.free(a)
    assert a == []
    b: list[int] = []
    assert bm.allocate(b, 6)
    assert set(b) == first


def test_freeing_twice_is_detected():
    bm = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    assert bm.allocate(table, 4)
    stale = list(table)
    bm.free(table)
    with pytest.raises(AssertionError, match="freed more often"):
        bm.free(stale)


def test_free_empty_table_is_noop():
    bm = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    bm.free(table)
    assert bm.num_free_blocks == 3
    assert bm.ref_counts == [0] * 4


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), max_size=10), block_size=st.sampled_from([1, 4, 16]))
def test_allocate_until_full(sizes, block_size):
    bm = BlockManager(num_blocks=10, block_size=block_size)
    tables = []
    for size in sizes:
        table: list[int] = []
        need = _ceil_div(size, block_size)
        free = bm.num_free_blocks
        assert bm.allocate(table, size) == (need <= free)
        tables.append(table)
    held = [b for t in tables for b in t]
    assert len(held) == len(set(held)) == bm.num_used_blocks
    for table in tables:
        bm.free(table)
    assert bm.num_free_blocks == bm.num_usable_blocks
