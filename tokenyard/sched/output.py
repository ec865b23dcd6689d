"""The one object that passes from the scheduler to the model runner each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenyard.kv.manager import KVTransfer


@dataclass(slots=True)
class ScheduledChunk:
    """Run ``token_ids`` at positions ``start_pos``.. for one request, whose KV lives in ``block_ids``."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # KV copies decided this step, in decision order. A ``blocking`` one runs before the forward pass, in this
    # order (later decisions may reuse what it released); the others overlap the step and report completion.
    transfers: list[KVTransfer] = field(default_factory=list)
    # Transfers of earlier steps, still in flight, that this step's forward pass needs landed.
    wait_for: list[int] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)              # ids the runner may forget

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def swap_out(self) -> list[tuple[int, int]]:
        """(device block, host block) pairs of this step's swap-outs."""
        return [(s + j, d + j) for t in self.transfers if t.to_host for s, d, n in t.segments for j in range(n)]

    @property
    def swap_in(self) -> list[tuple[int, int]]:
        """(host block, device block) pairs of this step's swap-ins and host prefix loads."""
        return [(s + j, d + j) for t in self.transfers if not t.to_host
                for s, d, n in t.segments for j in range(n)]

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.transfers and not self.wait_for
