"""Live migration, the handshake: reserve -> copy stages while decoding -> stop-and-copy -> commit, or abort.

Pure Python, no torch, no Ray: :func:`migrate` drives two :class:`Endpoint` s. In-process they are two
``MigrationEndpoint`` s (tests); in a cluster they are Ray actors (``cluster/runtime``), and the KV it passes
from ``read_blocks``/``freeze`` to ``write``/``commit`` is an object reference this driver never looks into.

The source keeps the request until the destination commits. Anything that fails before that (the destination
refuses, the request finishes or is preempted on the source, an endpoint dies, the caller's ``check`` says
stop) aborts: the destination frees its reservation and a frozen request resumes on the source.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Endpoint(Protocol):
    """One engine's side of the migration protocol (see ``tokenyard.engine.migration.MigrationEndpoint``)."""

    def reserve(self, key: str, num_blocks: int) -> bool: ...
    def read_blocks(self, request_id: str, start: int, max_bytes: int | None) -> tuple[Any, Any]: ...
    def write(self, key: str, start: int, data: Any) -> bool: ...
    def freeze(self, request_id: str, start: int, num_preemptions: int | None) -> tuple[Any, Any]: ...
    def commit(self, key: str, snapshot: Any, start: int, data: Any) -> bool: ...
    def resume(self, request_id: str) -> bool: ...
    def release(self, request_id: str) -> bool: ...
    def abort(self, key: str) -> None: ...


@dataclass
class MigrationResult:
    request_id: str
    committed: bool
    reason: str = ""                 # why it was aborted
    stages: int = 0                  # copy stages run while the request kept decoding
    blocks_staged: int = 0           # blocks copied in those stages
    blocks_final: int = 0            # blocks copied while the request was frozen
    downtime_s: float = 0.0          # frozen: from the freeze to the commit
    total_s: float = 0.0
    phases: list[str] = field(default_factory=list)   # the protocol steps taken, in order (for tests)
    # Whatever the source's freeze handed over beyond the snapshot (a cluster instance: its events for the
    # request not yet polled, so they cannot be lost with the source).
    source_extra: list[Any] = field(default_factory=list)


class _Abort(Exception):
    pass


def migrate(src: Endpoint, dst: Endpoint, request_id: str, key: str, num_blocks: int, *,
            max_stages: int = 3, stage_bytes: int | None = 16 << 20, check: Callable[[str], bool] | None = None,
            between_stages: Callable[[], None] | None = None) -> MigrationResult:
    """Move ``request_id`` from ``src`` to ``dst``, reserving ``num_blocks`` there first.

    Stages copy the full blocks the destination lacks, at most ``stage_bytes`` each (a stage holds up the
    source's decoding while it reads: large KV goes in several), until the destination has caught up and a stage
    finds nothing new, or ``max_stages`` stages ran past the bulk; then the request is frozen and the rest (the
    partial last block, what filled meanwhile) goes with its snapshot. ``max_stages=0``: no stages, a blocking
    copy. ``check(phase)`` is asked before each phase ("stage", "freeze", "commit"); False aborts there.
    ``between_stages`` runs after each stage (tests step the source engine there)."""
    t0 = time.perf_counter()
    res = MigrationResult(request_id, committed=False)
    frozen = False
    try:
        if not dst.reserve(key, num_blocks):
            res.reason = "the destination refused the reservation"
            res.phases.append("refused")
            res.total_s = time.perf_counter() - t0
            return res
        res.phases.append("reserved")
        start, preemptions = 0, None
        extra = 0   # stages after the destination first caught up
        while extra < max_stages:
            _check(check, "stage", res)
            info, data = src.read_blocks(request_id, start, stage_bytes)
            if info is None:
                raise _Abort("the request stopped running on the source")
            if preemptions is not None and info.num_preemptions != preemptions:
                raise _Abort("the request was preempted on the source during the migration")
            if info.end > start and not dst.write(key, start, data):
                raise _Abort("the destination could not take the blocks")
            res.stages += 1
            new = info.end - start
            res.blocks_staged += new
            start, preemptions = info.end, info.num_preemptions
            res.phases.append("stage")
            if between_stages is not None:
                between_stages()
            if start >= info.full:   # caught up with what was full when read
                extra += 1
                if new == 0:
                    break
        _check(check, "freeze", res)
        t_freeze = time.perf_counter()
        frozen = True   # from here a failure resumes it on the source (a no-op if the freeze did not happen)
        head, data = src.freeze(request_id, start, preemptions)
        if head is None:
            frozen = False
            raise _Abort("the request stopped running on the source")
        res.phases.append("frozen")
        snapshot, first, res.blocks_final = head[:3]
        res.source_extra = list(head[3]) if len(head) > 3 else []
        _check(check, "commit", res)
        if not dst.commit(key, snapshot, first, data):
            raise _Abort("the destination refused the commit")
        res.committed = True
        res.phases.append("committed")
        res.downtime_s = time.perf_counter() - t_freeze
        src.release(request_id)
        res.phases.append("released")
    except _Abort as e:
        res.reason = str(e)
    except Exception as e:  # noqa: BLE001 - an endpoint failed (a dead actor): abort, tell the caller why
        res.reason = f"{type(e).__name__}: {e}"
    if not res.committed:
        _safely(dst.abort, key)
        res.phases.append("aborted")
        if frozen:
            _safely(src.resume, request_id)
            res.phases.append("resumed")
    res.total_s = time.perf_counter() - t0
    return res


def _check(check: Callable[[str], bool] | None, phase: str, res: MigrationResult) -> None:
    if check is not None and not check(phase):
        raise _Abort(f"stopped before {phase}")


def _safely(fn: Callable[[str], Any], arg: str) -> None:
    try:
        fn(arg)
    except Exception:  # noqa: BLE001 - an endpoint that died has nothing left to free
        pass
