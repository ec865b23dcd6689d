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
    h = blake2b(parent_hash, digest_size=_DIGEST)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: list[int], block_size: int,
                        salt: str | None = None) -> None:
    """Append hashes for every full block of ``token_ids`` not hashed yet (the chain starts from the salt)."""
    n_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else root_hash(salt)
    for i in range(len(hashes), n_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
