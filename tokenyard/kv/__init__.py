"""KV cache: block bookkeeping (pure Python) and, in ``tensors``, the torch storage it indexes."""

from tokenyard.kv.block_pool import Block, BlockPool, HostBlockPool
from tokenyard.kv.manager import KVCacheManager

__all__ = ["Block", "BlockPool", "HostBlockPool", "KVCacheManager"]
