"""A request as the scheduler sees it: a state machine over token counts. Pure Python, no torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"          # queued; also where a recompute-preempted request goes back to
    RUNNING = "running"          # holds device blocks, scheduled every step it fits
    SWAPPED = "swapped"          # KV lives in host swap space
    # KV in flight (the transfer pins the blocks on both tiers until the runner reports it landed):
    SWAPPING_OUT = "swapping_out"  # preempted; its device blocks are being copied to the host
    SWAPPING_IN = "swapping_in"    # admitted; its KV is being copied to the device, it computes once landed
    FINISHED_STOPPED = "stop"    # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"   # max_tokens or the context window
    FINISHED_ABORTED = "abort"   # aborted by the caller (or a client that went away)

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    priority: int = 0                  # lower number = more urgent
    tenant: str = "default"
    arrival_time: float = field(default_factory=time.monotonic)
    max_model_len: int | None = None   # finish with "length" when the sequence reaches it
    cache_salt: str | None = None      # only requests with the same salt share prefix-cache blocks

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0       # tokens whose KV is in the cache
    num_cached_tokens: int = -1        # prompt tokens served from the prefix cache at first schedule
    num_preemptions: int = 0
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > 1

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """Finish by length or stop token id; stop strings are the engine's job (they need text)."""
        n = self.num_output_tokens
        if n >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        if n >= self.min_tokens and self.output_token_ids[-1] in self.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        return None
