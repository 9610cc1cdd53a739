"""The KV cache's block pool: reference counts, prefix caching, forking and copy-on-write.

Every mutation of block ownership happens here, O(1) per block:

* ``allocate`` grows a table for the tokens a step will compute. If the block those tokens are
  written into is shared (a fork), it is *copied on write*: the table gets a private block and a
  (src → dst) copy is recorded, which the model runner performs before the step's attention.
* ``fork`` gives a child sequence the parent's blocks, each reference count + 1.
* ``commit`` registers blocks that have just been filled in the prefix cache; ``match_prefix``
  hands a new sequence the longest cached run of full blocks of its tokens.
* ``free`` drops a table's references. A block whose count reaches zero goes to the free pool;
  a cached one stays findable there until its memory is needed (least recently freed first).
* ``trim`` drops a table's trailing blocks past a token count: those that held only draft
  tokens rejected by speculative decoding. Only computed tokens that were accepted are ever
  committed, so no cached block holds a rejected token.
* ``release_before`` drops the references to a table's leading blocks that a sliding window
  has left behind: their entries become the null block, so a sequence holds a bounded number
  of blocks however long it grows. Released blocks are freed like any other: a block still
  shared (a fork, a prefix another request holds) lives on for its other owners, and a cached
  one stays findable for later prompts.

Prefix-cache keys: a full block's key is a 128-bit BLAKE2b digest of its parent block's key and
its own token ids, so equal keys mean equal whole prefixes up to the block's end. A collision
would need two different prefixes with equal 128-bit digests (about 2^-64 after 2^32 distinct
blocks, by the birthday bound), far rarer than a hardware memory error; on top of that every hit
compares the block's own stored token ids, so a block never serves tokens other than its own.

A table's chain starts at its *root*: the empty key for the base model, a key of its own for
each LoRA adapter (:func:`root_key`), so K/V computed under one adapter is never served to
another, or to the base model, whatever the tokens.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedserve.kernels.attention import NULL_BLOCK

_ROOT_KEY = b""


def root_key(namespace: str | None) -> bytes:
    """The root of the prefix chains of sequences computed under ``namespace`` (an adapter's
    identity; None: the base model)."""
    if namespace is None:
        return _ROOT_KEY
    return hashlib.blake2b(namespace.encode(), digest_size=16, person=b"pagedserve-root").digest()


@dataclass
class BlockTable:
    """A sequence's blocks in position order, and the prefix keys of its leading full blocks."""

    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    num_released: int = 0  # leading entries released to the null block (sliding window)
    root: bytes = _ROOT_KEY  # the key its first block's key is chained from (root_key)

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass
class BlockManagerStats:
    prefix_queried_tokens: int = 0  # tokens of sequences that looked up the prefix cache
    prefix_hit_tokens: int = 0  # of those, tokens found cached (not computed again)
    cow_copies: int = 0
    evictions: int = 0  # cached blocks whose memory was reused for other tokens


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: its parent's key chained with its token ids."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    """Hands out fixed-size KV blocks, shares them, and takes them back.

    Block ``NULL_BLOCK`` is reserved (the attention kernels pad with it) and never handed out.
    A block is free exactly when its reference count is zero. Running out of blocks is normal:
    ``allocate`` returns ``False`` and changes nothing, and the scheduler decides whom to preempt.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
                 ) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.stats = BlockManagerStats()
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        # Free blocks that still hold a cached prefix, least recently freed first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}  # key -> block
        self._key_of: dict[int, bytes] = {}  # block -> key, for cached blocks
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its token ids, cached blocks
        self._copies: list[tuple[int, int]] = []

    # ---- capacity ----------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_shared_blocks(self) -> int:
        """Blocks referenced by more than one sequence."""
        return sum(1 for c in self.ref_counts if c > 1)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable in the prefix cache, in use or free."""
        return len(self._cached)

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        """How many more blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table.blocks))

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix, as vLLM's ``reset_prefix_cache``: only while no block is
        in use (returns ``False`` and changes nothing otherwise)."""
        if self.num_used_blocks:
            return False
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._key_of.clear()
        self._tokens_of.clear()
        return True

    # ---- allocation and copy-on-write ----------------------------------------------------------

    def allocate(self, table: BlockTable, num_tokens: int, num_computed: int) -> bool:
        """Makes ``table`` ready to hold ``num_tokens`` tokens of which the first
        ``num_computed`` are in the cache already; all or nothing.

        Shared blocks that the tokens from ``num_computed`` on will be written into are replaced
        by private copies (copy-on-write), recorded for ``take_copies``.
        """
        first_written = num_computed // self.block_size
        shared = [i for i in range(first_written, len(table.blocks))
                  if self.ref_counts[table.blocks[i]] > 1]
        if self.blocks_needed(table, num_tokens) + len(shared) > self.num_free_blocks:
            return False
        for i in shared:
            src = table.blocks[i]
            dst = self._take_free_block()
            self.ref_counts[src] -= 1
            table.blocks[i] = dst
            self._copies.append((src, dst))
            self.stats.cow_copies += 1
        for _ in range(self.blocks_needed(table, num_tokens)):
            table.blocks.append(self._take_free_block())
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src → dst) block copies recorded since the last call, in order."""
        copies, self._copies = self._copies, []
        return copies

    def fork(self, table: BlockTable) -> BlockTable:
        """A child's table sharing every block of ``table``."""
        for block in table.blocks[table.num_released:]:
            self.ref_counts[block] += 1
        return BlockTable(list(table.blocks), list(table.keys), table.num_released, table.root)

    def free(self, table: BlockTable) -> None:
        """Drops one reference to each block of the table and empties it.

        Blocks are released last first, so a cached prefix is evicted from its leaves inward.
        """
        self._drop(reversed(table.blocks[table.num_released:]))
        table.blocks.clear()
        table.keys.clear()
        table.num_released = 0

    def trim(self, table: BlockTable, num_tokens: int) -> None:
        """Frees the table's trailing blocks that hold none of its first ``num_tokens``
        tokens (last first, as ``free``)."""
        keep = max(-(-num_tokens // self.block_size), table.num_released)
        if keep >= len(table.blocks):
            return
        self._drop(reversed(table.blocks[keep:]))
        del table.blocks[keep:]
        del table.keys[keep:]

    def release_before(self, table: BlockTable, position: int) -> None:
        """Releases the table's blocks that hold only tokens before ``position`` (wholly
        outside a sliding window); their entries become the null block."""
        end = min(max(position, 0) // self.block_size, len(table.blocks))
        if end <= table.num_released:
            return
        dropped = table.blocks[table.num_released:end]
        table.blocks[table.num_released:end] = [NULL_BLOCK] * len(dropped)
        table.num_released = end
        self._drop(dropped)

    def _drop(self, blocks: Iterable[int]) -> None:
        """Drops one reference to each of ``blocks``; those no longer referenced are free."""
        released = set()
        for block in blocks:
            count = self.ref_counts[block] - 1
            if count < 0:
                raise AssertionError(f"block {block} freed more often than referenced")
            self.ref_counts[block] = count
            if count == 0:
                released.add(block)
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        if released and self._copies:
            # A copy into a block that is free again would clobber its next owner's tokens.
            self._copies = [c for c in self._copies if c[1] not in released]

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(block)]
            del self._tokens_of[block]
            self.stats.evictions += 1
        self.ref_counts[block] = 1
        return block

    # ---- prefix cache ----------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], root: bytes = _ROOT_KEY) -> BlockTable:
        """A table holding the longest cached run of full blocks of ``token_ids`` chained from
        ``root``, referenced.

        The last token is never taken from the cache: its logits must be computed.
        """
        table = BlockTable(root=root)
        if not self.enable_prefix_caching:
            return table
        bs = self.block_size
        self.stats.prefix_queried_tokens += len(token_ids)
        parent = root
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            tokens = token_ids[start: start + bs]
            key = block_key(parent, tokens)
            block = self._cached.get(key)
            if block is None or self._tokens_of[block] != tuple(tokens):
                break
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
            table.blocks.append(block)
            table.keys.append(key)
            parent = key
        self.stats.prefix_hit_tokens += len(table.blocks) * bs
        return table

    def pending_keys(self, table: BlockTable, token_ids: list[int]) -> list[bytes]:
        """Keys of the full blocks of ``token_ids`` past the table's committed ones: the blocks
        a prefill is about to fill."""
        keys: list[bytes] = []
        parent = table.keys[-1] if table.keys else table.root
        bs = self.block_size
        for i in range(len(table.keys), len(token_ids) // bs):
            parent = block_key(parent, token_ids[i * bs: (i + 1) * bs])
            keys.append(parent)
        return keys

    def next_key(self, table: BlockTable, token_ids: list[int]) -> bytes | None:
        """The key of the first block after the table's cached prefix, if it could be cached."""
        bs = self.block_size
        start = len(table.keys) * bs
        if start + bs >= len(token_ids):
            return None
        return block_key(table.keys[-1] if table.keys else table.root,
                         token_ids[start: start + bs])

    def commit(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Records the keys of blocks filled up to ``num_computed`` and caches them.

        A block whose prefix is cached already (two sequences computed it in the same step) is
        left out of the cache; its twin keeps serving the prefix.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(table.keys), num_computed // bs):
            tokens = token_ids[i * bs: (i + 1) * bs]
            key = block_key(table.keys[-1] if table.keys else table.root, tokens)
            table.keys.append(key)
            block = table.blocks[i]
            if block != NULL_BLOCK and key not in self._cached and block not in self._key_of:
                self._cached[key] = block
                self._key_of[block] = key
                self._tokens_of[block] = tuple(tokens)
