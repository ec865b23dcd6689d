"""Which KV blocks each request holds, on the device or in host swap space. Pure Python, no torch.

The scheduler asks this manager for room; it never touches tensors. Copies that follow from its answers
(swap out, swap in, a host prefix hit) are returned as :class:`KVTransfer` objects for the model runner.

KV in flight: a transfer holds a reference on every block it reads or writes, on both tiers, until it is
completed (:meth:`KVCacheManager.complete`). So no block is handed out again, and no hash is registered for
a copy that has not landed, while the copy runs; an abort in the middle frees the request's own references
and the transfer's go when it completes. Transfers are independent of one another: any completion order is
safe. The host tier is a hashed, ref-counted LRU cache like the device pool: full blocks never change, so a
host copy stays valid after a swap-in, the next swap-out of the same request copies only its new blocks, and a
new request whose prefix is on the host (a conversation's next turn) loads it instead of recomputing it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from tokenyard.invariants import InvariantError, require
from tokenyard.kv.block_pool import Block, BlockPool, HostBlockPool
from tokenyard.kv.hashing import BlockHash, extend_block_hashes, root_hash


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


Segment = tuple[int, int, int]  # (first source block, first destination block, number of blocks)


@dataclass(eq=False)
class KVTransfer:
    """Copies between the tiers for one request. ``to_host``: a swap-out; else a swap-in or host prefix hit."""

    transfer_id: int
    request_id: str
    to_host: bool
    segments: list[Segment]
    device: list[Block] = field(default_factory=list)   # pinned until complete: read (out) or written (in)
    host: list[Block] = field(default_factory=list)
    # Host blocks that take a hash when the copy has landed: (block, hash, content).
    register: list[tuple[Block, bytes, tuple[bytes, tuple[int, ...]]]] = field(default_factory=list)
    # A host prefix load: the hashes its source blocks must still carry until it lands.
    expect: list[bytes] = field(default_factory=list)
    blocking: bool = False     # the step's forward pass needs it done: copied before it, not overlapped

    @property
    def num_blocks_copied(self) -> int:
        return sum(n for _, _, n in self.segments)


def to_segments(pairs: list[tuple[int, int]], merge: bool) -> list[Segment]:
    """(src, dst) block pairs as copies: runs consecutive on both sides merged into one (block groups)."""
    out: list[list[int]] = []
    for s, d in pairs:
        if merge and out and s == out[-1][0] + out[-1][2] and d == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([s, d, 1])
    return [(s, d, n) for s, d, n in out]


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        enable_prefix_caching: bool = True,
        *,
        block_groups: bool = True,
        host_cache: bool = True,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        # The host tier keeps hashes (multi-turn reuse) when prefix caching and host_cache are both on.
        self.host_pool = HostBlockPool(num_host_blocks, enable_prefix_caching and host_cache)
        self.enable_prefix_caching = enable_prefix_caching
        self.block_groups = block_groups
        self.req_blocks: dict[str, list[Block]] = {}
        # block_ids() per request, rebuilt only after its blocks change (every 16th decode step, not each one)
        self._ids: dict[str, list[int]] = {}
        self.host_blocks: dict[str, list[Block]] = {}
        self.transfers: dict[int, KVTransfer] = {}
        # Live migration in: device blocks reserved for a request another instance is sending (by migration id).
        self.reservations: dict[str, list[Block]] = {}
        self._transfer_ids = itertools.count()
        self._hashes: dict[str, list[BlockHash]] = {}
        self._num_cached: dict[str, int] = {}
        # Statistics: prefix cache in tokens; swaps in blocks and copy operations.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.host_prefix_hits = 0
        self.swap_out_blocks = 0
        self.swap_in_blocks = 0
        self.swap_out_reused_blocks = 0
        self.swap_copies = 0

    # ----------------------------------------------------------------- prefix cache
    def _content(self, token_ids: list[int], hashes: list[BlockHash], i: int,
                 salt: str | None) -> tuple[bytes, tuple[int, ...]]:
        bs = self.block_size
        return (hashes[i - 1] if i else root_hash(salt), tuple(token_ids[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, req_id: str, token_ids: list[int],
                            salt: str | None = None) -> tuple[list[Block], int]:
        """Cached blocks covering a prefix of ``token_ids``; never the last token (it must run for logits)."""
        if not self.enable_prefix_caching:
            return [], 0
        hashes = self._hashes.setdefault(req_id, [])
        extend_block_hashes(hashes, token_ids, self.block_size, salt)
        hits = self._chain_hits(self.pool, token_ids, hashes, 0, salt)
        return hits, len(hits) * self.block_size

    def get_host_hits(self, req_id: str, token_ids: list[int], start: int,
                      salt: str | None = None) -> list[Block]:
        """Host blocks continuing a prefix hit of ``start`` blocks (call after get_computed_blocks)."""
        if not self.host_pool.enable_caching or not self.host_pool.num_blocks:
            return []
        return self._chain_hits(self.host_pool, token_ids, self._hashes.get(req_id, []), start, salt)

    def _chain_hits(self, pool: BlockPool, token_ids: list[int], hashes: list[BlockHash], start: int,
                    salt: str | None) -> list[Block]:
        """``pool``'s cached blocks for the prefix chain from block ``start`` on, until the first miss; never the
        block holding the last token (it must run for logits)."""
        hits: list[Block] = []
        for i in range(start, min((len(token_ids) - 1) // self.block_size, len(hashes))):
            block = pool.get_cached_block(hashes[i])
            if block is None or block.content != self._content(token_ids, hashes, i, salt):
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int, num_host_hit_tokens: int = 0) -> None:
        """Count a lookup whose request was admitted (a blocked queue head looks up again every step)."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens
            self.host_prefix_hits += num_host_hit_tokens

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
        for i in range(start, n_full):
            self.pool.cache(blocks[i], hashes[i], self._content(token_ids, hashes, i, salt))
        self._num_cached[req_id] = n_full

    # ----------------------------------------------------------------- device blocks
    def num_blocks_needed(self, req_id: str, num_tokens: int, new_computed: list[Block] = ()) -> int:
        held = len(self.req_blocks.get(req_id, ())) + len(new_computed)
        return max(cdiv(num_tokens, self.block_size) - held, 0)

    def allocate_slots(
        self, req_id: str, num_tokens: int, new_computed: list[Block] = ()
    ) -> bool:
        """Make the request hold blocks for its first ``num_tokens`` tokens. False (and no change) if full."""
        held = self.req_blocks.get(req_id)
        if not new_computed and held is not None:
            room = len(held) * self.block_size
            if num_tokens <= room:
                return True   # the common decode step: its blocks hold the next token already
            if num_tokens <= room + self.block_size:   # a decode crossing a block boundary: one more block
                if not self.pool.num_free_blocks:
                    return False
                self.append_block(req_id)
                return True
        n_new = self.num_blocks_needed(req_id, num_tokens, new_computed)
        if n_new > self.pool.num_free_if_touched(list(new_computed)):
            return False
        blocks = self.req_blocks.setdefault(req_id, [])
        if new_computed:
            self._ids.pop(req_id, None)
            self.pool.touch(list(new_computed))
            blocks.extend(new_computed)
        if n_new:
            new = self.pool.allocate(n_new, self._after(blocks))
            blocks.extend(new)
            self._extend_ids(req_id, [b.block_id for b in new])
        return True

    def append_block(self, req_id: str) -> None:
        """One more block at the end of the request's blocks (a decode crossing a block boundary). The caller
        made sure a block is free."""
        held = self.req_blocks[req_id]
        block = self.pool.allocate_one(self._after(held))
        held.append(block)
        self._extend_ids(req_id, [block.block_id])

    def _extend_ids(self, req_id: str, new_ids: list[int]) -> None:
        """The cached block-id list of a request whose blocks grew by ``new_ids`` at the end: a new list (chunks of
        earlier steps may hold the old one)."""
        ids = self._ids.get(req_id)
        if ids is not None:
            self._ids[req_id] = ids + new_ids

    def _after(self, blocks: list[Block]) -> int | None:
        return blocks[-1].block_id if blocks and self.block_groups else None

    def trim(self, req_id: str, num_tokens: int) -> None:
        """Free the request's blocks beyond its first ``num_tokens`` tokens (work of this step rolled back)."""
        blocks = self.req_blocks.get(req_id)
        keep = cdiv(num_tokens, self.block_size)
        if blocks and len(blocks) > keep:
            self.pool.free(blocks[keep:][::-1])
            del blocks[keep:]
            self._ids.pop(req_id, None)

    def block_ids(self, req_id: str) -> list[int]:
        """The request's device block ids, in order. A shared list, valid until its blocks change: read it,
        never modify it (a later change makes a new list)."""
        ids = self._ids.get(req_id)
        if ids is None:
            blocks = self.req_blocks.get(req_id)
            if blocks is None:
                return []
            ids = self._ids[req_id] = [b.block_id for b in blocks]
        return ids

    def free(self, req_id: str, forget_hashes: bool = True) -> None:
        """Drop the request's own device and host references (a transfer in flight keeps its own)."""
        blocks = self.req_blocks.pop(req_id, None)
        self._ids.pop(req_id, None)
        if blocks:
            self.pool.free(blocks[::-1])
        host = self.host_blocks.pop(req_id, None)
        if host:
            self.host_pool.free(host[::-1])
        self._num_cached.pop(req_id, None)
        if forget_hashes:
            self._hashes.pop(req_id, None)

    # ----------------------------------------------------------------- live migration (between instances)
    def reserve(self, key: str, num_blocks: int) -> list[int] | None:
        """Hold ``num_blocks`` device blocks (preferably one run) for a request migrating in; None if they are not
        free. Calling it again for the same key grows the reservation."""
        held = self.reservations.get(key, [])
        if num_blocks > self.pool.num_free_blocks:
            return None
        held.extend(self.pool.allocate(num_blocks, self._after(held)))
        self.reservations[key] = held
        return [b.block_id for b in held]

    def release_reservation(self, key: str) -> None:
        """The migration was aborted: its reserved blocks go back to the pool."""
        blocks = self.reservations.pop(key, None)
        if blocks:
            self.pool.free(blocks[::-1])

    def adopt(self, key: str, req_id: str, token_ids: list[int], num_computed: int,
              salt: str | None = None) -> None:
        """The migration committed: the request owns the first reserved blocks its KV fills (the rest go back),
        and its full blocks enter this instance's prefix cache."""
        blocks = self.reservations.pop(key)
        keep = cdiv(num_computed, self.block_size)
        require(len(blocks) >= keep and req_id not in self.req_blocks,
                f"adopting {req_id}: {len(blocks)} reserved blocks for {keep}, or it holds blocks already")
        if len(blocks) > keep:
            self.pool.free(blocks[keep:][::-1])
        self.req_blocks[req_id] = blocks[:keep]
        self._ids.pop(req_id, None)
        self.cache_full_blocks(req_id, token_ids, num_computed, salt)

    # ----------------------------------------------------------------- transfers between the tiers
    def can_swap_out(self, req_id: str) -> bool:
        return len(self.req_blocks.get(req_id, ())) <= self.host_pool.num_free_blocks

    def swap_out(self, req_id: str, token_ids: list[int], num_computed: int,
                 salt: str | None = None) -> KVTransfer:
        """Move the request's KV to the host tier. Full blocks whose copy the host already holds (from an earlier
        swap, or another request with the same prefix) are not copied again. The device blocks stay pinned by
        the transfer until it completes."""
        blocks = self.req_blocks.get(req_id, [])
        host: list[Block | None] = [None] * len(blocks)
        contents: list[tuple[bytes, tuple[int, ...]] | None] = [None] * len(blocks)
        hashes = self._hashes.setdefault(req_id, [])
        if self.host_pool.enable_caching:
            extend_block_hashes(hashes, token_ids, self.block_size, salt)
            for i in range(min(num_computed // self.block_size, len(hashes), len(blocks))):
                contents[i] = content = self._content(token_ids, hashes, i, salt)
                hit = self.host_pool.get_cached_block(hashes[i])
                if hit is not None and hit.content == content:
                    host[i] = hit
        reused = [b for b in host if b is not None]
        missing = [i for i, b in enumerate(host) if b is None]
        if len(missing) > self.host_pool.num_free_if_touched(reused):
            raise RuntimeError(f"swap_out of {req_id}: host tier full (check can_swap_out first)")
        del self.req_blocks[req_id]
        self._ids.pop(req_id, None)
        self._num_cached.pop(req_id, None)
        self.host_pool.touch(reused)
        fresh = self.host_pool.allocate(len(missing))
        for i, b in zip(missing, fresh):
            host[i] = b
        t = self._new_transfer(req_id, True, [(blocks[i].block_id, host[i].block_id) for i in missing])
        # The request's device references pass to the transfer for the blocks it copies; the rest go now.
        copied = set(missing)
        t.device = [blocks[i] for i in missing]
        self.pool.free([b for i, b in enumerate(blocks) if i not in copied][::-1])
        t.host = list(fresh)
        self.host_pool.touch(t.host)        # the transfer's own; the request keeps the host blocks below
        t.register = [(host[i], hashes[i], contents[i]) for i in missing if contents[i] is not None]
        self.host_blocks[req_id] = host     # type: ignore[assignment]
        self.swap_out_blocks += len(missing)
        self.swap_out_reused_blocks += len(reused)
        return t

    def swapped_device_hits(self, req_id: str) -> list[Block]:
        """Device prefix-cache blocks that hold the first of a swapped-out request's host blocks already (a
        prefix another request keeps on the device): a swap-in shares them instead of copying them."""
        hits: list[Block] = []
        if not self.enable_prefix_caching:
            return hits
        for hb in self.host_blocks.get(req_id, ()):
            if hb.block_hash is None:   # only landed full blocks carry a hash
                break
            block = self.pool.get_cached_block(hb.block_hash)
            if block is None or block.content != hb.content:
                break
            hits.append(block)
        return hits

    def swap_in(self, req_id: str, device_hits: list[Block] = ()) -> KVTransfer:
        """Bring a swapped-out request's KV back to the device: ``device_hits`` (from swapped_device_hits) are
        shared, the rest is copied into freshly allocated, preferably contiguous, blocks."""
        host = self.host_blocks.pop(req_id, [])
        k = len(device_hits)
        self.pool.touch(list(device_hits))
        blocks = self.pool.allocate(len(host) - k)
        self.req_blocks[req_id] = [*device_hits, *blocks]
        self._ids.pop(req_id, None)
        if k:
            self.host_pool.free(host[:k][::-1])   # not read: the device has them
        t = self._new_transfer(req_id, False, [(h.block_id, b.block_id) for h, b in zip(host[k:], blocks)])
        t.host = host[k:]                    # the request's host references pass to the transfer
        t.device = list(blocks)
        self.pool.touch(t.device)            # pinned against an abort while the copy writes them
        self.swap_in_blocks += len(host) - k
        return t

    def load_host_hits(self, req_id: str, host_hits: list[Block], token_ids: list[int],
                       salt: str | None = None) -> KVTransfer:
        """After allocate_slots gave a request its device prefix hits: device blocks for the prefix found on
        the host, filled by the returned transfer (the request computes from after them once it lands). The
        caller has pinned ``host_hits`` (a reference each); the transfer takes those references over."""
        blocks = self.req_blocks.setdefault(req_id, [])
        hashes = self._hashes.get(req_id, [])
        first = len(blocks)
        for i, h in enumerate(host_hits, start=first):
            require(h.block_hash == hashes[i] and h.content == self._content(token_ids, hashes, i, salt)
                    and self.host_pool.get_cached_block(h.block_hash) is h,
                    f"host prefix block {h.block_id} of {req_id} changed before it was loaded")
        fresh = self.pool.allocate(len(host_hits), self._after(blocks))
        blocks.extend(fresh)
        self._ids.pop(req_id, None)
        t = self._new_transfer(req_id, False, [(h.block_id, b.block_id) for h, b in zip(host_hits, fresh)])
        t.host = list(host_hits)
        t.expect = [h.block_hash for h in host_hits]
        t.device = list(fresh)
        self.pool.touch(t.device)
        self.swap_in_blocks += len(host_hits)
        return t

    def _new_transfer(self, req_id: str, to_host: bool, pairs: list[tuple[int, int]]) -> KVTransfer:
        t = KVTransfer(next(self._transfer_ids), req_id, to_host, to_segments(pairs, self.block_groups))
        self.transfers[t.transfer_id] = t
        self.swap_copies += len(t.segments)
        return t

    def complete(self, transfer_id: int) -> KVTransfer:
        """A transfer's copies have landed: release what it pinned; host copies of full blocks take their hash."""
        t = self.transfers.pop(transfer_id)
        for block, h, content in t.register:
            self.host_pool.cache(block, h, content)
        if t.device:
            self.pool.free(t.device[::-1])
        if t.host:
            self.host_pool.free(t.host[::-1])
        return t

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
        """No block leaked, double owned or dangling, on either tier; every block in flight pinned."""
        dev_refs = self.pool.ref_counts()
        host_refs = self.host_pool.ref_counts()
        self.pool.check(dev_refs)
        self.host_pool.check(host_refs)
        owned = [0] * self.pool.num_blocks
        host_owned = [0] * self.host_pool.num_blocks
        for req_id, cached in self._ids.items():
            require(cached == [b.block_id for b in self.req_blocks.get(req_id, ())],
                    f"block_ids of {req_id} is stale: {cached}")
        for req_id, blocks in self.req_blocks.items():
            ids = [b.block_id for b in blocks]
            require(len(ids) == len(set(ids)), f"request {req_id} holds a block twice: {ids}")
            for i in ids:
                owned[i] += 1
            require(req_id not in self.host_blocks, f"request {req_id} holds device and host blocks")
        for blocks in self.reservations.values():
            for b in blocks:
                owned[b.block_id] += 1
        for req_id, blocks in self.host_blocks.items():
            ids = [b.block_id for b in blocks]
            require(len(ids) == len(set(ids)), f"request {req_id} holds a host block twice: {ids}")
            for i in ids:
                host_owned[i] += 1
        writer: dict[tuple[bool, int], int] = {}   # (host tier?, block) -> the in-flight transfer writing it
        for t in self.transfers.values():
            for b in t.device:
                owned[b.block_id] += 1
            for b in t.host:
                host_owned[b.block_id] += 1
            # Every block a copy reads or writes is pinned by that transfer (so never handed out meanwhile).
            pinned = {(False, b.block_id) for b in t.device} | {(True, b.block_id) for b in t.host}
            for s, d, n in t.segments:
                for j in range(n):
                    src, dst = (not t.to_host, s + j), (t.to_host, d + j)
                    require(src in pinned and dst in pinned, f"transfer {t.transfer_id} copies a block it does "
                            f"not pin: {src if src not in pinned else dst}")
                    other = writer.setdefault(dst, t.transfer_id)
                    require(other == t.transfer_id, f"transfers {other} and {t.transfer_id} both write {dst}")
            for h, want in zip(t.host, t.expect):
                require(h.block_hash == want and self.host_pool.get_cached_block(want) is h,
                        f"transfer {t.transfer_id} loads host block {h.block_id}, which no longer holds its prefix")
        for t in self.transfers.values():   # nothing in flight reads a block another in-flight copy writes
            for s, _, n in t.segments:
                for j in range(n):
                    other = writer.get((not t.to_host, s + j), t.transfer_id)
                    require(other == t.transfer_id, f"transfer {t.transfer_id} reads a block transfer {other} writes")
        for refs, counted, tier in ((dev_refs, owned, "device"), (host_refs, host_owned, "host")):
            if refs != counted:
                i = next(i for i in range(len(refs)) if refs[i] != counted[i])
                raise InvariantError(f"{tier} block {i}: ref_cnt={refs[i]}, owners={counted[i]}")
