"""Which KV blocks each request holds, on the device or in host swap space. Pure Python, no torch.

The scheduler asks this manager for room; it never touches tensors. Copies that follow from its answers
(swap out, swap in) are returned as block-id pairs for the model runner to execute.
"""

from __future__ import annotations

from collections import Counter

from tokenyard.invariants import require
from tokenyard.kv.block_pool import Block, BlockPool, HostBlockPool
from tokenyard.kv.hashing import BlockHash, extend_block_hashes, root_hash


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        enable_prefix_caching: bool = True,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.host_pool = HostBlockPool(num_host_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[Block]] = {}
        self.host_blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        self._num_cached: dict[str, int] = {}
        # Host blocks a swap-in read this step: released when the step's decisions are final (end_step), so a
        # swap-out decided later in the same step cannot overwrite them before the runner copies them in.
        self._host_reading: list[int] = []
        # Statistics, in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ----------------------------------------------------------------- prefix cache
    def get_computed_blocks(self, req_id: str, token_ids: list[int],
                            salt: str | None = None) -> tuple[list[Block], int]:
        """Cached blocks covering a prefix of ``token_ids``; never the last token (it must run for logits)."""
        if not self.enable_prefix_caching:
            return [], 0
        hashes = self._hashes.setdefault(req_id, [])
        extend_block_hashes(hashes, token_ids, self.block_size, salt)
        max_blocks = (len(token_ids) - 1) // self.block_size
        bs = self.block_size
        hits: list[Block] = []
        parent = root_hash(salt)
        for i, h in enumerate(hashes[:max_blocks]):
            block = self.pool.get_cached_block(h)
            if block is None or block.content != (parent, tuple(token_ids[i * bs:(i + 1) * bs])):
                break
            hits.append(block)
            parent = h
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count a lookup whose request was admitted (a blocked queue head looks up again every step)."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def cache_full_blocks(self, req_id: str, token_ids: list[int], num_computed: int,
                          salt: str | None = None) -> None:
        """Register blocks whose every token now has KV in the cache."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(req_id)
        if not blocks:
            return
        n_full = min(num_computed // self.block_size, len(blocks))
        start = self._num_cached.get(req_id, 0)
        if n_full <= start:
            return
        hashes = self._hashes.setdefault(req_id, [])
        extend_block_hashes(hashes, token_ids, self.block_size, salt)
        bs = self.block_size
        for i in range(start, n_full):
            parent = hashes[i - 1] if i else root_hash(salt)
            self.pool.cache(blocks[i], hashes[i], (parent, tuple(token_ids[i * bs:(i + 1) * bs])))
        self._num_cached[req_id] = n_full

    # ----------------------------------------------------------------- device blocks
    def num_blocks_needed(self, req_id: str, num_tokens: int, new_computed: list[Block] = ()) -> int:
        held = len(self.req_blocks.get(req_id, ())) + len(new_computed)
        return max(cdiv(num_tokens, self.block_size) - held, 0)

    def allocate_slots(
        self, req_id: str, num_tokens: int, new_computed: list[Block] = ()
    ) -> bool:
        """Make the request hold blocks for its first ``num_tokens`` tokens. False (and no change) if full."""
        n_new = self.num_blocks_needed(req_id, num_tokens, new_computed)
        if n_new > self.pool.num_free_if_touched(list(new_computed)):
            return False
        blocks = self.req_blocks.setdefault(req_id, [])
        if new_computed:
            self.pool.touch(list(new_computed))
            blocks.extend(new_computed)
        if n_new:
            blocks.extend(self.pool.allocate(n_new))
        return True

    def trim(self, req_id: str, num_tokens: int) -> None:
        """Free the request's blocks beyond its first ``num_tokens`` tokens (work of this step rolled back)."""
        blocks = self.req_blocks.get(req_id)
        keep = cdiv(num_tokens, self.block_size)
        if blocks and len(blocks) > keep:
            self.pool.free(blocks[keep:][::-1])
            del blocks[keep:]

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req_id, ())]

    def free(self, req_id: str, forget_hashes: bool = True) -> None:
        """Drop the request's device and host blocks. Tail blocks go to the free queue first."""
        blocks = self.req_blocks.pop(req_id, None)
        if blocks:
            self.pool.free(blocks[::-1])
        host = self.host_blocks.pop(req_id, None)
        if host:
            self.host_pool.free(host)
        self._num_cached.pop(req_id, None)
        if forget_hashes:
            self._hashes.pop(req_id, None)

    # ----------------------------------------------------------------- swap
    def can_swap_out(self, req_id: str) -> bool:
        return len(self.req_blocks.get(req_id, ())) <= self.host_pool.num_free_blocks

    def swap_out(self, req_id: str) -> list[tuple[int, int]]:
        """Move the request's blocks to host space; returns (device, host) copies to run before reuse."""
        blocks = self.req_blocks.pop(req_id, [])
        host = self.host_pool.allocate(len(blocks))
        self.host_blocks[req_id] = host
        self.pool.free(blocks[::-1])
        self._num_cached.pop(req_id, None)
        return [(b.block_id, h) for b, h in zip(blocks, host)]

    def swap_in(self, req_id: str) -> list[tuple[int, int]]:
        """Bring the request's blocks back to the device; returns (host, device) copies."""
        host = self.host_blocks.pop(req_id, [])
        blocks = self.pool.allocate(len(host))
        self.req_blocks[req_id] = blocks
        self._host_reading.extend(host)
        return [(h, b.block_id) for h, b in zip(host, blocks)]

    def end_step(self) -> None:
        """The step's decisions are final: host blocks read by its swap-ins become free."""
        if self._host_reading:
            self.host_pool.free(self._host_reading)
            self._host_reading = []

    # ----------------------------------------------------------------- stats & checks
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks

    def check_invariants(self) -> None:
        """No block leaked, double owned or dangling; host space likewise."""
        self.pool.check()
        refs: Counter[int] = Counter()
        for req_id, blocks in self.req_blocks.items():
            ids = [b.block_id for b in blocks]
            require(len(ids) == len(set(ids)), f"request {req_id} holds a block twice: {ids}")
            refs.update(ids)
            require(req_id not in self.host_blocks, f"request {req_id} holds device and host blocks")
        for block in self.pool.blocks:
            require(block.ref_cnt == refs.get(block.block_id, 0),
                    f"block {block.block_id}: ref_cnt={block.ref_cnt}, owners={refs.get(block.block_id, 0)}")
        self.host_pool.check([h for hs in self.host_blocks.values() for h in hs] + self._host_reading)
