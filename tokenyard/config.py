"""Engine configuration. Defaults serve a laptop; the CLI maps its flags onto these fields one to one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from tokenyard.sched.policies import POLICY_NAMES, check_policy_name

QUANTIZATIONS = ("auto", "none", "int8", "q4")   # --quantization (model/quant.py, model/loader.py)


def _opt(default, help: str, choices: tuple | None = None):
    """A field with the help text (and choices) its CLI flag shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EngineConfig:
    model: str | None = _opt(None, "Hugging Face directory or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    max_num_batched_tokens: int = _opt(512, "token budget of one step, and so the prefill chunk size")
    max_num_seqs: int = _opt(256, "running requests at most")
    block_size: int = _opt(16, "tokens per KV block")
    num_kv_blocks: int | None = _opt(None, "device KV blocks (default: as many as --kv-cache-memory-gb holds; on "
                                     "CUDA without it, what --gpu-memory-utilization leaves)")
    kv_cache_memory_gb: float | None = _opt(None, "memory for the KV cache when --num-kv-blocks is not given "
                                            "(default: 1 GB on CPU; on CUDA, sized by --gpu-memory-utilization)")
    gpu_memory_utilization: float = _opt(0.9, "CUDA: the share of the GPU's memory this engine may use for "
                                         "weights, activations, CUDA graphs and KV cache; the KV cache gets what "
                                         "is left after a profiling pass at the full token budget (vLLM's meaning)")
    enforce_eager: bool = _opt(False, "CUDA: run every step eagerly (no CUDA-graph capture of decode steps)")
    max_graph_batch_size: int = _opt(256, "CUDA: decode batches up to this size replay captured graphs (padded to "
                                     "the next bucket: 1, 2, 4, 8, then multiples of 8 up to 64, then of 32)")
    num_host_blocks: int | None = _opt(None, "host swap blocks (default: as many as --swap-space-gb holds)")
    swap_space_gb: float = _opt(1.0, "host memory for swapped-out KV (with --preemption-mode swap)")
    enable_prefix_caching: bool = _opt(True, "reuse the KV of shared prompt prefixes")
    preemption_mode: str = _opt("recompute", "what a preempted request loses: its KV (recompute) or its place "
                                "on the device (swap to host)", ("recompute", "swap"))
    swap_overlap: str = _opt("auto", "with swap: copy KV swaps beside the forward pass (a swapped-in request "
                             "computes once its copy has landed) instead of before it; auto: on for CUDA, off on "
                             "CPU, where the copy takes about a millisecond on the cores the forward pass uses",
                             ("auto", "on", "off"))
    swap_block_groups: bool = _opt(True, "with swap: allocate KV blocks in contiguous runs and copy each run as "
                                   "one copy (off: one copy per block)")
    host_prefix_cache: bool = _opt(True, "with swap: keep swapped-out KV on the host as a prefix cache (a swap-out "
                                   "copies only blocks the host lacks; a later turn loads its history from there)")
    scheduling_policy: str = _opt("fcfs", "whose turn it is: arrival order, priority, per-tenant fair share (VTC), "
                                  "or priority bands with fair share inside", POLICY_NAMES)
    tenant_weights: str | None = _opt(None, "VTC tenant weights: 'alice=2,bob=1', or a file of such pairs or a "
                                      "JSON object; tenants not named weigh 1")
    vtc_w_p: float = _opt(1.0, "VTC service per prompt token")
    vtc_w_q: float = _opt(2.0, "VTC service per output token")
    max_model_len: int | None = _opt(None, "context window (default: the model's)")
    device: str | None = _opt(None, "cpu or cuda (default: cuda if available)")
    dtype: str = _opt("auto", "weights and KV cache dtype; auto: bfloat16 on CUDA, float32 on CPU (half "
                      "precision is slow on CPUs without AMX)", ("auto", "float32", "bfloat16", "float16"))
    quantization: str = _opt("auto", "CPU weights: auto keeps a GGUF's Q4_1/Q8_0 blocks as they are (an HF "
                             "directory stays in its dtype); int8 / q4 quantize linear weights at load (q8_0 / "
                             "q4_1 blocks of 32, the embedding q8_0); none runs fp32", QUANTIZATIONS)
    num_threads: int | None = _opt(None, "torch CPU threads (default: torch's)")
    check_invariants: bool = _opt(False, "run the scheduler/KV integrity check after every step (tests; slower)")
    step_log: str | None = _opt(None, "append one JSON line per step to this file (the step's shape and seconds): "
                                "`tokenyard profile --from-step-log FILE` fits the simulator's cost model to them")

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("num_kv_blocks", "num_host_blocks", "max_model_len", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "num_host_blocks" else 1)):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_memory_gb is not None and (
                isinstance(self.kv_cache_memory_gb, bool) or not isinstance(self.kv_cache_memory_gb, (int, float))
                or not self.kv_cache_memory_gb > 0):
            raise ValueError(f"kv_cache_memory_gb must be a number > 0, got {self.kv_cache_memory_gb!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {u!r}")
        if not isinstance(self.max_graph_batch_size, int) or self.max_graph_batch_size < 0:
            raise ValueError(f"max_graph_batch_size must be an integer >= 0, got {self.max_graph_batch_size!r}")
        if isinstance(self.swap_overlap, bool):   # the Python API may say True / False
            self.swap_overlap = "on" if self.swap_overlap else "off"
        if self.swap_overlap not in ("auto", "on", "off"):
            raise ValueError(f"swap_overlap must be 'auto', 'on' or 'off', got {self.swap_overlap!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be auto, none, int8 or q4, got {self.quantization!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        check_policy_name(self.scheduling_policy)
        for name in ("vtc_w_p", "vtc_w_q"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.vtc_w_p + self.vtc_w_q <= 0:
            raise ValueError("vtc_w_p and vtc_w_q must not both be 0")
        self.tenant_weight_map()  # validates

    def tenant_weight_map(self) -> dict[str, float]:
        return parse_tenant_weights(self.tenant_weights)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def parse_tenant_weights(spec: str | None) -> dict[str, float]:
    """``"alice=2,bob=0.5"``, or the path of a file holding either a JSON object ``{"alice": 2}`` or such pairs
    (one per line or comma-separated; ``#`` starts a comment). Tenants not named weigh 1."""
    if spec is None or not spec.strip():
        return {}
    where = "tenant_weights"
    text = spec
    path = Path(spec)
    if "=" not in spec and not spec.lstrip().startswith("{"):
        if not path.is_file():
            raise ValueError(f"tenant_weights: {spec!r} is neither name=weight pairs nor a readable file")
        text, where = path.read_text(), f"tenant_weights file {spec}"
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object of tenant -> weight")
        pairs = list(raw.items())
    else:
        pairs = []
        for line in text.splitlines():
            for item in line.split("#", 1)[0].split(","):
                if not item.strip():
                    continue
                name, sep, value = item.partition("=")
                if not sep or not name.strip():
                    raise ValueError(f"{where}: {item.strip()!r} is not name=weight")
                try:
                    pairs.append((name.strip(), float(value)))
                except ValueError:
                    raise ValueError(f"{where}: weight of {name.strip()!r} is not a number: {value.strip()!r}") \
                        from None
    weights: dict[str, float] = {}
    for name, w in pairs:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf"):
            raise ValueError(f"{where}: weight of {name!r} must be a positive number, got {w!r}")
        if name in weights:
            raise ValueError(f"{where}: tenant {name!r} is given twice")
        weights[name] = float(w)
    return weights


__all__ = ["EngineConfig", "POLICY_NAMES", "parse_tenant_weights"]
