"""Device KV block pool: reference counts, an LRU free queue and the prefix-cache hash map.

Pure Python bookkeeping (no torch): the simulator and the cluster layer reuse it unchanged.

A block with ``ref_cnt == 0`` sits in the free queue. If it still carries a hash it also stays in the
prefix-cache map, so a later request with the same prefix can take it back (a cache hit) until the pool
hands it out to somebody else, which evicts the hash. Blocks are evicted least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenyard.invariants import require


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    # What the hash stands for: (parent block's hash, this block's token ids). A hit is taken only when it
    # equals the request's own, so even a hash collision cannot hand one prompt another's KV.
    content: tuple[bytes, tuple[int, ...]] | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Ordered by the time the block was freed: the head is evicted first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, Block] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def get_cached_block(self, block_hash: bytes) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` free blocks (evicting their cached hashes). Caller checks capacity first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
                block.content = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference on each block. Pass tail-first so the tail of a sequence is evicted first."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def cache(self, block: Block, block_hash: bytes, content: tuple[bytes, tuple[int, ...]]) -> None:
        """Register a full block under its chained hash (the first block with a hash keeps it)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.content = content
        self._cached[block_hash] = block

    def num_free_if_touched(self, blocks: list[Block]) -> int:
        """Free blocks left after taking references on ``blocks`` (cache hits sitting in the free queue)."""
        return len(self._free) - sum(1 for b in blocks if b.ref_cnt == 0)

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
            block.content = None
        self._cached.clear()

    def check(self) -> None:
        """Raise InvariantError if the pool's own structures disagree."""
        free_ids = set(self._free)
        require(len(free_ids) == len(self._free), "a block is in the free queue twice")
        for block in self.blocks:
            require(block.ref_cnt >= 0, f"block {block.block_id} has negative refs")
            require((block.ref_cnt == 0) == (block.block_id in free_ids),
                    f"block {block.block_id}: ref_cnt={block.ref_cnt} but in free queue={block.block_id in free_ids}")
        for h, block in self._cached.items():
            require(block.block_hash == h, f"cached block {block.block_id} hash mismatch")


class HostBlockPool:
    """Blocks of the host (CPU) swap space. No sharing: each swapped request owns its host blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} host blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))

    def check(self, owned: list[int]) -> None:
        all_ids = list(self._free) + owned
        require(len(all_ids) == len(set(all_ids)), "host block owned twice or both free and owned")
        require(len(all_ids) == self.num_blocks,
                f"host blocks leaked: {self.num_blocks - len(all_ids)} neither free nor owned")
