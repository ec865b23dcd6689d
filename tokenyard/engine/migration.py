"""Live migration of a running request between engines, with its KV cache: both ends, for one engine.

The protocol (driven by the cluster's coordinator, see ``tokenyard.cluster.coordinator``):

1. destination ``reserve(key, n)``: hold ``n`` free blocks for the request, or refuse;
2. stages, while the request keeps decoding on the source: source ``read_blocks(rid, start)`` returns the KV
   of its full computed blocks from ``start`` on (full blocks never change again), destination ``write`` them;
3. last stage: source ``freeze(rid, start)`` stops scheduling the request and returns its snapshot plus the KV
   of its remaining blocks; destination ``commit(key, snapshot, start, kv)`` writes them and runs the request;
4. source ``release(rid)`` frees it; if anything failed: destination ``abort(key)``, source ``resume(rid)``.

The source owns the request until the commit; every step can be aborted and frees what it held. KV travels
as numpy arrays (views of one gathered tensor), which Ray moves between processes without pickling them.
Every method runs on the engine's own thread, between steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tokenyard.kv.manager import cdiv
from tokenyard.sampling_params import SamplingParams
from tokenyard.sched.request import Request, RequestStatus


@dataclass
class StageInfo:
    """Where a request migrating out stands: blocks ``[0, full)`` are full (immutable); a stage read blocks up to
    ``end``."""

    full: int
    num_preemptions: int   # changes when a preemption threw its KV away (what was sent is stale)
    end: int = 0           # the blocks read go up to here (at most ``full``)


@dataclass
class RequestSnapshot:
    """Everything a request is apart from its KV: enough to continue it exactly on another engine."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    max_tokens: int
    stop_token_ids: frozenset[int]
    min_tokens: int
    priority: int
    tenant: str
    arrival_time: float
    cache_salt: str | None
    params: SamplingParams
    generator_state: bytes | None = None   # the request's sampling generator (seeded sampling continues exactly)


class MigrationEndpoint:
    """Both ends of live migration for one ``LLMEngine``."""

    def __init__(self, engine) -> None:   # an LLMEngine (not imported: it imports this module's users)
        self.engine = engine
        self.kv = engine.kv
        self.scheduler = engine.scheduler
        self.store = engine.runner.store
        self.block_size = engine.kv.block_size

    # ----------------------------------------------------------------- KV as arrays
    def _read(self, block_ids: list[int]) -> np.ndarray:
        t = self.store.kv[torch.tensor(block_ids, dtype=torch.long, device=self.store.kv.device)].cpu()
        if t.dtype == torch.bfloat16:   # numpy has no bfloat16: move the bits
            t = t.view(torch.int16)
        return t.numpy()

    def _write(self, block_ids: list[int], data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        with warnings.catch_warnings():   # Ray hands over read-only arrays; this one is only read from
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(data)
        if self.store.kv.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        if tuple(t.shape[1:]) != tuple(self.store.kv.shape[1:]) or t.dtype != self.store.kv.dtype:
            raise ValueError(f"KV blocks of shape {tuple(t.shape)} {t.dtype} do not fit this engine's cache "
                             f"{tuple(self.store.kv.shape)} {self.store.kv.dtype}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.store.kv.device)
        self.store.kv.index_copy_(0, idx, t.to(self.store.kv.device))

    # ----------------------------------------------------------------- source side
    def read_blocks(self, request_id: str, start: int,
                    max_bytes: int | None = None) -> tuple[StageInfo | None, np.ndarray]:
        """KV of the running request's full computed blocks from block ``start`` on, at most ``max_bytes`` of them
        (at least one block): ``kv[start:end]``, and where it stands (``StageInfo.end``). Info None if it is not
        running here (finished, aborted, queued again: the migration stops). Two values, so a caller can forward
        the KV without looking at it. The copy runs on the engine's thread, between steps: ``max_bytes`` bounds
        how long one stage holds up this engine's decoding."""
        req = self.scheduler.requests.get(request_id)
        if req is None or req.status is not RequestStatus.RUNNING or request_id in self.scheduler.detached:
            return None, self._empty()
        full = req.num_computed_tokens // self.block_size
        end = full
        if max_bytes is not None:
            end = min(full, start + max(max_bytes // self.store.block_bytes, 1))
        ids = self.kv.block_ids(request_id)[start:end]
        info = StageInfo(full, req.num_preemptions, end)
        return info, self._read(ids) if ids else self._empty()

    def freeze(self, request_id: str, start: int,
               num_preemptions: int | None = None) -> tuple[tuple[RequestSnapshot, int, int] | None, np.ndarray]:
        """Stop running the request and hand over the rest: ``((snapshot, first block sent, blocks sent), kv)``.
        The KV sent so far is stale if the request was preempted since (``num_preemptions`` differs: its KV was
        recomputed); then every block goes again, from block 0."""
        req = self.scheduler.detach(request_id)
        if req is None:
            return None, self._empty()
        if num_preemptions is not None and req.num_preemptions != num_preemptions:
            start = 0
        ids = self.kv.block_ids(request_id)[start:cdiv(req.num_computed_tokens, self.block_size)]
        state = self.engine.runner.states.get(request_id)
        gen = state.generator.get_state().numpy().tobytes() if state is not None and state.generator else None
        snap = RequestSnapshot(
            request_id=request_id, prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids), num_computed_tokens=req.num_computed_tokens,
            num_cached_tokens=req.num_cached_tokens, num_preemptions=req.num_preemptions, max_tokens=req.max_tokens,
            stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens, priority=req.priority, tenant=req.tenant,
            arrival_time=req.arrival_time, cache_salt=req.cache_salt,
            params=state.params if state is not None else SamplingParams(max_tokens=req.max_tokens),
            generator_state=gen,
        )
        return (snap, start, len(ids)), self._read(ids) if ids else self._empty()

    def resume(self, request_id: str) -> bool:
        """The migration failed after ``freeze``: the request runs here again (False: aborted meanwhile)."""
        return self.scheduler.reattach(request_id)

    def release(self, request_id: str) -> bool:
        """The destination committed: forget the request here and free its blocks."""
        ok = self.scheduler.release(request_id)
        self.engine.runner.remove_requests([request_id])
        return ok

    # ----------------------------------------------------------------- destination side
    def reserve(self, key: str, num_blocks: int) -> bool:
        """Hold ``num_blocks`` blocks for an incoming request; False (nothing held) if they are not free or every
        seat is taken."""
        s = self.scheduler
        if key in self.kv.reservations or s._seats_taken >= s.config.max_num_seqs:
            return False
        return self.kv.reserve(key, num_blocks) is not None

    def write(self, key: str, start: int, data: np.ndarray) -> bool:
        """KV of blocks ``start`` .. ``start + len(data)`` of the incoming request (grows the reservation if the
        request outgrew it). False if the reservation is gone or cannot grow."""
        blocks = self.kv.reservations.get(key)
        if blocks is None:
            return False
        end = start + len(data)
        if end > len(blocks) and self.kv.reserve(key, end - len(blocks)) is None:
            return False
        if len(data):
            self._write([b.block_id for b in self.kv.reservations[key][start:end]], data)
        return True

    def commit(self, key: str, snap: RequestSnapshot, start: int, data: np.ndarray) -> bool:
        """Write the last KV and run the request here from the next step. False (reservation kept, for
        ``abort``) if it cannot be taken: no seat, its id is live here, or the blocks cannot grow."""
        e = self.engine
        if snap.request_id in self.scheduler.requests or not self.write(key, start, data):
            return False
        if len(self.kv.reservations[key]) < cdiv(snap.num_computed_tokens, self.block_size):
            return False
        req = Request(
            request_id=snap.request_id, prompt_token_ids=list(snap.prompt_token_ids), max_tokens=snap.max_tokens,
            stop_token_ids=snap.stop_token_ids, min_tokens=snap.min_tokens, priority=snap.priority,
            tenant=snap.tenant, arrival_time=snap.arrival_time, max_model_len=e.max_model_len,
            cache_salt=snap.cache_salt,
        )
        for tok in snap.output_token_ids:
            req.append_output_token(tok)
        req.num_computed_tokens = snap.num_computed_tokens
        req.num_cached_tokens = snap.num_cached_tokens
        req.num_preemptions = snap.num_preemptions
        req.first_scheduled_time = self.scheduler.clock()
        e.add_sample_state(snap.request_id, snap.params, snap.stop_token_ids, list(snap.prompt_token_ids))
        try:
            state = e.runner.states[snap.request_id]
            for tok in snap.output_token_ids:
                state.record(tok)
            if snap.generator_state is not None and state.generator is not None:
                state.generator.set_state(torch.frombuffer(bytearray(snap.generator_state), dtype=torch.uint8))
            adopted = self.scheduler.adopt(req, key)
        except BaseException:
            e.runner.remove_requests([snap.request_id])
            raise
        if not adopted:
            e.runner.remove_requests([snap.request_id])
        return adopted

    def abort(self, key: str) -> None:
        """The migration was given up: free the reservation (no-op if it is gone or was committed)."""
        self.kv.release_reservation(key)

    def _empty(self) -> np.ndarray:
        shape = (0, *self.store.kv.shape[1:])
        dtype = torch.int16 if self.store.kv.dtype == torch.bfloat16 else self.store.kv.dtype
        return torch.empty(shape, dtype=dtype).numpy()
