"""KV block pool: reference counts, free lists, the prefix-cache hash map, and contiguous runs (block groups).

Pure Python bookkeeping (no torch): the simulator and the cluster layer reuse it unchanged.

A block with ``ref_cnt == 0`` is free. If it still carries a hash it also stays in the prefix-cache map, so a
later request with the same prefix can take it back (a cache hit) until the pool hands it out to somebody
else, which evicts the hash. Free blocks without a hash ("clean") are handed out first; cached ones are
evicted least recently freed first.

Block groups. With the block-major tensor layout a run of consecutive block ids is one contiguous range, so
swapping it is one copy; allocation therefore hands out runs where it can:

1. a request's new blocks extend the run its table ends with, while the following blocks are free;
2. then the first clean run of the whole size;
3. then the longest clean runs there are (taking clean blocks evicts nothing);
4. then eviction, at group granularity: the least recently freed cached block goes, together with the free
   blocks around it up to the size still needed. Per-block LRU eviction would scatter every allocation once
   the prefix cache fills the pool (in steady state nearly every free block is cached): it picks blocks in
   the order they were freed, not by position. Group eviction keeps LRU's choice of the oldest block and
   takes its neighbours with it, so a neighbour may go before an older block elsewhere: a little cache for
   far fewer copies. Extending a run (1) may likewise evict the cached block that follows it.

The same class serves the host tier (``HostBlockPool``), where hashes let a swap-out skip the blocks whose
copy the host already holds and let a new turn of a conversation find its history there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenyard.invariants import InvariantError, require


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    # What the hash stands for: (parent block's hash, this block's token ids). A hit is taken only when it
    # equals the request's own, so even a hash collision cannot hand one prompt another's KV.
    content: tuple[bytes, tuple[int, ...]] | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, *, allow_empty: bool = False) -> None:
        if num_blocks < (0 if allow_empty else 1):
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # A byte per block, searched for runs: 1 = free (clean or cached) in _free, 1 = free and clean in _clean.
        self._free = bytearray(b"\x01") * num_blocks
        self._clean = bytearray(b"\x01") * num_blocks
        self._num_clean = num_blocks
        # Free blocks with a hash, ordered by the time they were freed: the head is evicted first.
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, Block] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self._num_clean + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def get_cached_block(self, block_hash: bytes) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, n: int, after: int | None = None) -> list[Block]:
        """Take ``n`` free blocks, as few runs as the free space allows (see the module docstring); ``after``:
        the block id the new ones should follow (a request's last block). Caller checks capacity first."""
        if n == 1:
            return [self.allocate_one(after)]
        return self._allocate_runs(n, after)

    def _allocate_runs(self, n: int, after: int | None) -> list[Block]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free_blocks} free")
        ids: list[int] = []
        free, clean = self._free, self._clean
        if after is not None:
            i = after + 1
            end = free.find(0, i) if i < self.num_blocks else i
            end = self.num_blocks if end < 0 else end
            run = range(i, min(end, i + n))
            self._take(run)
            ids.extend(run)
        need = n - len(ids)
        if need > 1:
            start = clean.find(b"\x01" * need)
            if start >= 0:
                run = range(start, start + need)
                self._take(run)
                ids.extend(run)
                need = 0
        while need and self._num_clean:
            start = clean.find(1)
            if need > 1:   # the longest clean run (there is none of the whole size)
                best, pos = 0, start
                while pos >= 0:
                    end = clean.find(0, pos)
                    end = self.num_blocks if end < 0 else end
                    if end - pos > best:
                        best, start = end - pos, pos
                    pos = clean.find(1, end)
            end = clean.find(0, start)
            end = self.num_blocks if end < 0 else end
            run = range(start, min(end, start + need))
            self._take(run)
            ids.extend(run)
            need -= len(run)
        while need:        # group eviction around the least recently freed cached block
            oldest = next(iter(self._cached_free))
            lo = free.rfind(0, 0, oldest) + 1
            hi = free.find(0, oldest)
            hi = self.num_blocks if hi < 0 else hi
            take = min(need, hi - lo)
            start = max(lo, min(oldest, hi - take))
            run = range(start, start + take)
            self._take(run)
            ids.extend(run)
            need -= take
        blocks = self.blocks
        if ids and ids[-1] - ids[0] == n - 1 and ids == list(range(ids[0], ids[0] + n)):
            out = blocks[ids[0]:ids[0] + n]   # one run: a slice
        else:
            out = [blocks[i] for i in ids]
        for block in out:
            block.ref_cnt = 1
        return out

    def allocate_one(self, after: int | None = None) -> Block:
        """``allocate(1, after)``'s choice without its run search (a decode crossing a block boundary): the block
        right after ``after`` if free, else the first clean one, else the least recently freed cached one."""
        i = -1 if after is None else after + 1
        clean = self._clean
        if not (0 <= i < self.num_blocks and self._free[i]):
            if self._num_clean:
                i = clean.find(1)
            elif self._cached_free:
                i = next(iter(self._cached_free))
            else:
                raise RuntimeError("asked for 1 block, 0 free")
        if clean[i]:   # _take, for one block
            self._free[i] = clean[i] = 0
            self._num_clean -= 1
        else:
            self._take((i,))
        block = self.blocks[i]
        block.ref_cnt = 1
        return block

    def _take(self, ids: range | list[int] | tuple[int, ...]) -> None:
        """Mark free blocks as handed out, evicting the hashes of cached ones."""
        if type(ids) is range and ids.step == 1 and len(ids) > 1:
            a, b = ids.start, ids.stop
            if self._clean.count(1, a, b) == b - a:   # a clean run (the common case): marked at once
                zeros = bytes(b - a)
                self._free[a:b] = zeros
                self._clean[a:b] = zeros
                self._num_clean -= b - a
                return
        free, clean, cached_free, cached, blocks = self._free, self._clean, self._cached_free, self._cached, self.blocks
        taken_clean = evicted = 0
        for i in ids:
            free[i] = 0
            if clean[i]:
                clean[i] = 0
                taken_clean += 1
                continue
            del cached_free[i]
            block = blocks[i]
            h = block.block_hash
            if cached.get(h) is block:
                del cached[h]
            block.block_hash = None
            block.content = None
            evicted += 1
        self._num_clean -= taken_clean
        self.num_evictions += evicted

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on each block (cache hits; a transfer pinning the blocks it copies)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free[block.block_id] = 0
                if block.block_hash is None:
                    self._clean[block.block_id] = 0
                    self._num_clean -= 1
                else:
                    del self._cached_free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference on each block. Pass tail-first so the tail of a sequence is evicted first."""
        free, clean, cached_free = self._free, self._clean, self._cached_free
        cleaned = 0
        try:
            for block in blocks:
                ref = block.ref_cnt
                if ref == 1:
                    block.ref_cnt = 0
                    i = block.block_id
                    free[i] = 1
                    if block.block_hash is None:
                        clean[i] = 1
                        cleaned += 1
                    else:
                        cached_free[i] = None
                elif ref > 1:
                    block.ref_cnt = ref - 1
                else:
                    raise RuntimeError(f"double free of block {block.block_id}")
        finally:
            self._num_clean += cleaned

    def cache(self, block: Block, block_hash: bytes, content: tuple[bytes, tuple[int, ...]]) -> None:
        """Register a full block under its chained hash (the first block with a hash keeps it)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        if block.ref_cnt == 0:  # a free clean block becomes a free cached one
            self._clean[block.block_id] = 0
            self._num_clean -= 1
            self._cached_free[block.block_id] = None
        block.block_hash = block_hash
        block.content = content
        self._cached[block_hash] = block

    def num_free_if_touched(self, blocks: list[Block]) -> int:
        """Free blocks left after taking references on ``blocks`` (cache hits sitting in the free queue)."""
        return self.num_free_blocks - sum(1 for b in blocks if b.ref_cnt == 0)

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
            block.content = None
        for block_id in self._cached_free:
            self._clean[block_id] = 1
        self._num_clean += len(self._cached_free)
        self._cached_free.clear()
        self._cached.clear()

    def ref_counts(self) -> list[int]:
        return [b.ref_cnt for b in self.blocks]

    def check(self, refs: list[int] | None = None) -> None:
        """Raise InvariantError if the pool's own structures disagree. Whole-pool comparisons run as bytes
        operations, so the check stays cheap on pools of hundreds of thousands of blocks."""
        n = self.num_blocks
        refs = self.ref_counts() if refs is None else refs
        require(min(refs, default=0) >= 0, "a block has negative refs")
        zero = bytes(map((0).__eq__, refs))                           # 1 where ref_cnt == 0
        no_hash = bytes(b.block_hash is None for b in self.blocks)
        require(self._num_clean == self._clean.count(1), "clean-block count disagrees with the clean map")
        cached = bytearray(n)
        for i in self._cached_free:
            cached[i] = 1
        as_int = int.from_bytes
        free, clean, cached_i = as_int(self._free, "big"), as_int(self._clean, "big"), as_int(cached, "big")
        require(clean & cached_i == 0, "a block is both clean and cached free")
        require(free == clean | cached_i, "the free map disagrees with the free lists")
        if zero != bytes(self._free):
            i = next(i for i in range(n) if zero[i] != self._free[i])
            raise InvariantError(f"block {i}: ref_cnt={refs[i]} but free={bool(self._free[i])}")
        nh = as_int(no_hash, "big")
        require(clean == free & nh, "a free block is in the wrong free list for its hash")
        for h, block in self._cached.items():
            require(block.block_hash == h, f"cached block {block.block_id} hash mismatch")
        require(n - no_hash.count(1) == len(self._cached), "a block carries a hash the prefix-cache map lost")


class HostBlockPool(BlockPool):
    """The host (CPU) tier: same bookkeeping as the device pool; may be empty (no swap space)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_blocks}")
        super().__init__(num_blocks, enable_caching, allow_empty=True)
