"""The KV cache's block pool: allocation, reference counts and freeing, O(1) per block."""

from __future__ import annotations

from collections import deque

from kernels.attention import NULL_BLOCK


class BlockManager:
    """Hands out fixed-size KV blocks to sequences and takes them back.

    Block ``NULL_BLOCK`` is reserved (the attention kernels pad with it) and never handed out.
    A block is free exactly when its reference count is zero; counts above one mean the block is
    shared between sequences. Running out of blocks is normal: ``allocate`` returns ``False`` and
    changes nothing, and the scheduler decides whom to preempt.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """How many more blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grows ``block_table`` in place to hold ``num_tokens``; all or nothing."""
        needed = self.blocks_needed(block_table, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block = self._free.popleft()
            self.ref_counts[block] = 1
            block_table.append(block)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drops one reference to each block of the table and empties it."""
        for block in reversed(block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
            elif self.ref_counts[block] < 0:
                raise AssertionError(f"block {block} freed more often than referenced")
        block_table.clear()
