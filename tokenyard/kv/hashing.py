"""Chained block hashes for prefix caching.

The hash of block ``i`` covers the token ids of that block and the hash of block ``i - 1``, so equal hashes
mean equal whole prefixes, not only equal blocks. Python's hash of a tuple of ints is deterministic across
processes (no hash randomisation for ints), which the cluster layer relies on to compare prefixes.
"""

from __future__ import annotations

ROOT_HASH = 0x5EED


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


def extend_block_hashes(hashes: list[int], token_ids: list[int], block_size: int) -> None:
    """Append hashes for every full block of ``token_ids`` not hashed yet."""
    n_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), n_full):
        parent = hash_block(parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        hashes.append(parent)
