"""Decode attention over the paged KV cache: one kernel per device, with a pure-PyTorch fallback.

The backends (``decode_backend`` picks one for a device and dtype):
- ``cpu-kernel``: C++ (``csrc/paged_attention.cpp``), fp32 on CPU. It reads each sequence's keys and values in
  place through its block table. Compiled on first use with torch's C++ extension loader (about 20 s with
  g++, cached under the tokenyard cache directory afterwards).
- ``triton``: a Triton kernel (``triton_attention.py``) for CUDA, any dtype, also reading in place.
- ``sdpa``: gathers the context into a padded tensor and calls SDPA, an extra copy of the whole context per
  layer. Used where neither kernel is available (no compiler, no Triton, another dtype on CPU), or with
  TOKENYARD_DISABLE_KERNELS=1.
"""

from __future__ import annotations

import fcntl
import logging
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("paged_attention.cpp", "quant_matmul.cpp", "thread_pool.cpp")]


def _cpu_flags() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if " avx2" in info and " fma" in info else []


@contextmanager
def build_lock(build: Path) -> Iterator[None]:
    """Hold tokenyard's own lock on the build directory (an flock: the OS drops it when its process dies).

    torch's extension loader guards a build with a plain ``lock`` file that a killed build leaves behind,
    and then every later start waits on it forever. Whoever holds this flock is the only tokenyard process
    building here, so a ``lock`` file it finds is such a leftover and is removed."""
    with open(build / ".tokenyard-build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = build / "lock"
            if stale.exists():
                log.warning("removing a stale kernel build lock left by an interrupted build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@lru_cache(maxsize=1)
def load_kernel():
    """The compiled extension module, or None when it cannot be built here."""
    if os.environ.get("TOKENYARD_DISABLE_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        from tokenyard.model.loader import cache_root

        build = cache_root() / "kernels" / f"torch-{torch.__version__}"
        build.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-fopenmp", "-ffp-contract=off", *_cpu_flags()]
        with build_lock(build):
            if not any(build.glob("tokenyard_paged_attention*.so")):
                print("tokenyard: compiling the paged-attention kernel (once; about a minute on 2 cores) ...",
                      file=sys.stderr, flush=True)
            return load(name="tokenyard_paged_attention", sources=[str(p) for p in _SOURCES], extra_cflags=flags,
                        build_directory=str(build), verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
        log.warning("paged attention kernel unavailable (%s); using the PyTorch fallback", e)
        return None


@lru_cache(maxsize=1)
def load_triton_kernel():
    """The Triton kernel's launcher, or None where Triton is missing or refuses (the fallback runs then)."""
    if os.environ.get("TOKENYARD_DISABLE_KERNELS") == "1":
        return None
    try:
        from tokenyard.model.triton_attention import paged_decode_attention
    except Exception as e:  # noqa: BLE001 - no Triton (or a broken one) means: use the fallback
        log.warning("Triton paged attention unavailable (%s); using the PyTorch fallback", e)
        return None
    return paged_decode_attention


def decode_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``cpu-kernel``, ``triton`` or ``sdpa``: see the module docstring."""
    if device.type == "cpu" and dtype == torch.float32 and load_kernel() is not None:
        return "cpu-kernel"
    if device.type == "cuda" and load_triton_kernel() is not None and triton_kernel_works(device, dtype):
        return "triton"
    return "sdpa"


@lru_cache(maxsize=8)
def triton_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the Triton kernel once on a small problem against the SDPA fallback: a Triton that fails to compile
    here, or computes wrong numbers, means the fallback (with a warning) rather than a crash mid-serving."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block, num_blocks = 8, 2, 64, 16, 12
    k = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(3, heads, dim, generator=g).to(device=device, dtype=dtype)
    lens = torch.tensor([1, 40, 150], device=device)
    tables = torch.randint(0, num_blocks, (3, 10), generator=g).to(device)
    mask = (torch.arange(10 * block, device=device)[None, :] < lens[:, None])[:, None, None, :]
    try:
        got = decode_attention(q, k, v, tables, lens, None, dim ** -0.5, "triton").float()
        want = decode_attention(q, k, v, tables, lens, mask, dim ** -0.5, "sdpa").float()
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here means: use the fallback
        log.warning("the Triton paged attention kernel failed its self-check (%s); using the PyTorch fallback", e)
        return False
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol):
        log.warning("the Triton paged attention kernel disagrees with SDPA (max diff %.3g); using the PyTorch "
                    "fallback", float((got - want).abs().max()))
        return False
    return True


def decode_attention(
    q: torch.Tensor,             # [n, heads, dim]
    k_cache: torch.Tensor,       # [num_blocks, block_size, kv_heads, dim] (one layer)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [n, max_blocks] int64 (int32 also for triton)
    context_lens: torch.Tensor,  # [n] int64
    mask: torch.Tensor | None,   # [n, 1, 1, max_blocks * block_size] bool; the sdpa fallback needs it
    scale: float,
    backend: str,
) -> torch.Tensor:
    """One query token per sequence; returns [n, heads, dim]."""
    if backend == "cpu-kernel":
        return load_kernel().paged_decode_attention(q.contiguous(), k_cache, v_cache, block_tables,
                                                    context_lens, scale)
    if backend == "triton":
        return load_triton_kernel()(q, k_cache, v_cache, block_tables, context_lens, scale)
    n = q.shape[0]
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    flat = block_tables.view(-1)
    keys = k_cache.index_select(0, flat).view(n, -1, kv_heads, dim).transpose(1, 2)
    vals = v_cache.index_select(0, flat).view(n, -1, kv_heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.contiguous().unsqueeze(2), keys, vals, attn_mask=mask, scale=scale,
                                         enable_gqa=kv_heads != q.shape[1])
    return out.squeeze(2)
