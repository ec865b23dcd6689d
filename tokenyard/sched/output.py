"""The one object that passes from the scheduler to the model runner each step."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block), run first
    swap_in: list[tuple[int, int]] = field(default_factory=list)   # (host block, device block)
    preempted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)              # ids the runner may forget

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.swap_out and not self.swap_in
