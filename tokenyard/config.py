"""Engine configuration. Defaults serve a laptop; the CLI maps its flags onto these fields one to one."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class EngineConfig:
    model: str | None = None                 # HF directory or .gguf file; None: the bundled SmolLM2
    max_num_batched_tokens: int = 512        # token budget of one step (Sarathi's chunk size)
    max_num_seqs: int = 256                  # running requests at most
    block_size: int = 16                     # tokens per KV block
    num_kv_blocks: int | None = None         # device KV blocks; None: from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    num_host_blocks: int | None = None       # host swap blocks; None: from swap_space_gb
    swap_space_gb: float = 1.0
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"       # "recompute" | "swap"
    scheduling_policy: str = "fcfs"          # "fcfs" | "priority"
    max_model_len: int | None = None         # None: the model's context window
    device: str | None = None                # None: cuda if available, else cpu
    dtype: str = "float32"                   # "float32" | "bfloat16" | "float16"
    num_threads: int | None = None           # torch CPU threads; None: torch's default
    check_invariants: bool = False           # run the KV/scheduler integrity check after every step

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("num_kv_blocks", "num_host_blocks", "max_model_len", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "num_host_blocks" else 1)):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
