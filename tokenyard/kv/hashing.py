"""Chained block hashes for prefix caching.

The hash of block ``i`` covers the token ids of that block and the hash of block ``i - 1``, so equal hashes
mean equal whole prefixes, not only equal blocks. It is a 128-bit BLAKE2b digest: a prefix-cache hit hands one
request another's KV, so a collision would serve the wrong tokens (across tenants, a leak); Python's 64-bit
``hash()`` of a tuple is not made to resist that. The digests are the same in every process, which the cluster
layer relies on to compare prefixes.

A request may carry a ``cache_salt`` (vLLM's name): it seeds the chain, so only requests with the same salt
share blocks. A tenant that must not share (or reveal, through ``cached_tokens``) its prompts sets one.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

BlockHash = bytes
_DIGEST = 16
ROOT_HASH: BlockHash = blake2b(b"tokenyard prefix cache", digest_size=_DIGEST).digest()


def root_hash(salt: str | None = None) -> BlockHash:
    if not salt:
        return ROOT_HASH
    return blake2b(b"tokenyard prefix cache salt:" + salt.encode("utf-8", "surrogatepass"),
                   digest_size=_DIGEST).digest()


def hash_block(parent_hash: BlockHash, token_ids: list[int] | tuple[int, ...]) -> BlockHash:
    return hash_bytes(parent_hash, array("q", token_ids))


def hash_bytes(parent_hash: BlockHash, data) -> BlockHash:
    """The digest of a block whose token ids, as 64-bit integers, are the bytes of ``data``."""
    h = blake2b(parent_hash, digest_size=_DIGEST)
    h.update(data)
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: list[int], block_size: int,
                        salt: str | None = None) -> None:
    """Append hashes for every full block of ``token_ids`` not hashed yet (the chain starts from the salt)."""
    n_full = len(token_ids) // block_size
    start = len(hashes)
    if start >= n_full:
        return
    parent = hashes[-1] if hashes else root_hash(salt)
    # The new blocks' tokens as one array: each block hashes a slice of its bytes (what hash_block hashes).
    tokens = array("q", token_ids[start * block_size:n_full * block_size])
    data = memoryview(tokens).cast("B")
    step = block_size * tokens.itemsize
    for off in range(0, (n_full - start) * step, step):
        parent = hash_bytes(parent, data[off:off + step])
        hashes.append(parent)
