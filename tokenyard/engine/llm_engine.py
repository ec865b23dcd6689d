"""The engine: validates requests, runs scheduler step -> model runner -> outputs, and frees what ends."""

from __future__ import annotations

import itertools
import logging
import platform
import sys
import time
from collections.abc import Iterable

import torch

import tokenyard
from tokenyard.config import EngineConfig
from tokenyard.engine.kv_store import KVStore
from tokenyard.engine.model_runner import ModelRunner
from tokenyard.engine.output_processor import OutputProcessor, TokenEvent
from tokenyard.engine.sampler import SAMPLE_FAILED
from tokenyard.kv.manager import KVCacheManager
from tokenyard.model.config import ModelConfig
from tokenyard.model.loader import load_state_dict, read_hf_config, resolve_model
from tokenyard.model.tokenizer import Tokenizer
from tokenyard.outputs import RequestOutput
from tokenyard.sampling_params import InvalidParameterError, SamplingParams
from tokenyard.sched.output import SchedulerOutput
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig
from tokenyard.sim.steplog import StepLog

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str | None) -> torch.device:
    """The device to run on (None: cuda when available); a clear ValueError for one this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: {name!r} is not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device: {name!r} was asked for, but {why}; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {name!r}: tokenyard runs on cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto``: bfloat16 on CUDA, float32 on CPU (half precision is slow on CPUs without AMX)."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def resolve_quantization(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Block-quantized weights run on CPU with fp32 activations, through the C++ extension: ``auto`` falls
    back to ``none`` elsewhere; an explicit ``int8`` / ``q4`` there is a ValueError naming the reason."""
    from tokenyard.model.paged_attention import load_kernel

    if name == "none":
        return name
    why = None
    if device.type != "cpu":
        why = f"it runs on CPU, not {device.type} (use --dtype bfloat16 there)"
    elif dtype != torch.float32:
        why = "it computes in float32 (use --dtype float32 or auto)"
    elif load_kernel() is None:
        why = "its kernels are in the C++ extension, which could not be built here (see the log)"
    if why is None:
        return name
    if name == "auto":
        return "none"
    raise ValueError(f"quantization {name!r}: {why}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_max_tokens(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """The prompt and its output must fit the context window (InvalidParameterError naming max_tokens)."""
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidParameterError(
            "max_tokens", f"the prompt has {num_prompt_tokens} tokens and max_tokens is {max_tokens}, but the "
                          f"model's context window is {max_model_len}: ask for at most "
                          f"{max_model_len - num_prompt_tokens} tokens")


def tokenize_prompt(tokenizer: Tokenizer, prompt: str | list[int], vocab_size: int, max_model_len: int) -> list[int]:
    """Prompt text or token ids -> validated token ids (ValueError naming `prompt` otherwise)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidParameterError("prompt", "prompt must not be empty")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise InvalidParameterError("prompt", "prompt token ids must be integers")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidParameterError(
                "prompt", f"prompt token id {bad[0]} outside the vocabulary [0, {vocab_size})"
            )
    else:
        raise InvalidParameterError("prompt", f"prompt must be a string or a list of token ids, got {type(prompt)}")
    if not ids:
        raise InvalidParameterError("prompt", "prompt must not be empty")
    if len(ids) >= max_model_len:
        raise InvalidParameterError(
            "prompt",
            f"prompt has {len(ids)} tokens but the model's context window is {max_model_len} "
            f"(at least one token must be left to generate)",
        )
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        t0 = time.perf_counter()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        resolved = resolve_model(config.model)
        self.model_name = resolved.name
        self.model_config = ModelConfig.from_hf(read_hf_config(resolved.hf_dir))
        self.tokenizer = Tokenizer(resolved.hf_dir)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        device = _device(config.device)
        if device.type == "cpu" and tokenyard.OMP_SETTING_MISSED:
            log.warning("torch was imported before tokenyard without OMP_WAIT_POLICY set: OpenMP threads will spin "
                        "against the CPU kernels (a prefill can take ~3x longer). Import tokenyard first, or set "
                        "OMP_WAIT_POLICY=PASSIVE in the environment.")
        dtype = _DTYPES[resolve_dtype(config.dtype, device)]
        per_block = KVStore.bytes_per_block(mc, config.block_size, dtype)
        self.quantization = resolve_quantization(config.quantization, device, dtype)
        state = load_state_dict(resolved.hf_dir, self.quantization)
        self.runner = ModelRunner(mc, state, block_size=config.block_size,
                                  max_model_len=self.max_model_len, device=device, dtype=dtype)
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        elif config.kv_cache_memory_gb is not None or device.type != "cuda":
            num_blocks = max(int((config.kv_cache_memory_gb or 1.0) * 2**30) // per_block, 1)
        else:
            num_blocks = self._blocks_from_gpu_memory(per_block)
        if config.num_host_blocks is not None:
            num_host = config.num_host_blocks
        else:
            num_host = int(config.swap_space_gb * 2**30) // per_block if config.preemption_mode == "swap" else 0
        self.runner.allocate_kv(num_blocks, num_host)
        if device.type == "cuda" and not config.enforce_eager and config.max_graph_batch_size > 0:
            self._capture_decode_graphs(min(config.max_graph_batch_size, config.max_num_seqs))
        self.kv = KVCacheManager(num_blocks, config.block_size, num_host, config.enable_prefix_caching,
                                 block_groups=config.swap_block_groups, host_cache=config.host_prefix_cache)
        self.kv_block_bytes = per_block
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                scheduling_policy=config.scheduling_policy,
                preemption_mode=config.preemption_mode,
                swap_overlap=config.swap_overlap == "on" or (config.swap_overlap == "auto" and device.type == "cuda"),
                vtc_w_p=config.vtc_w_p,
                vtc_w_q=config.vtc_w_q,
                tenant_weights=config.tenant_weight_map(),
            ),
            self.kv,
        )
        eos = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.outputs = OutputProcessor(self.tokenizer)   # detokenization and stop strings (see step_events)
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.load_time_s = time.perf_counter() - t0
        self.last_decision = SchedulerOutput()   # the last step's scheduler output (step log, profile)
        self._step_log = StepLog(config.step_log, self.step_log_header()) if config.step_log else None

    # ------------------------------------------------------------------ requests
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Prompt text or token ids -> validated token ids (ValueError naming `prompt` otherwise)."""
        return tokenize_prompt(self.tokenizer, prompt, self.model_config.vocab_size, self.max_model_len)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        tenant: str = "default",
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        track_output: bool = True,
    ) -> str:
        """Validate and queue a request. Raises ValueError before any state changes.

        ``cache_salt``: only requests with the same salt share prefix-cache blocks (a tenant's privacy).
        ``track_output=False``: the caller turns this request's token events into text itself (the cluster
        frontend does, see :meth:`step_events`); :meth:`step` returns no output for it."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError("sampling_params", "sampling_params must be a SamplingParams")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError("priority", f"priority must be an integer, got {priority!r}")
        if not isinstance(tenant, str) or not tenant:
            raise InvalidParameterError("tenant", f"tenant must be a non-empty string, got {tenant!r}")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidParameterError("cache_salt", f"cache_salt must be a non-empty string, got {cache_salt!r}")
        ids = self.tokenize_prompt(prompt)
        vocab = self.model_config.vocab_size
        bad = [t for t in params.logit_bias if t >= vocab]
        if bad:
            raise InvalidParameterError("logit_bias", f"logit_bias names token id {bad[0]}, outside the "
                                                      f"vocabulary [0, {vocab})")
        check_max_tokens(len(ids), params.max_tokens, self.max_model_len)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.scheduler.requests or rid in self.outputs:
            raise InvalidParameterError("request_id", f"request_id {rid!r} is already in use")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        req = Request(
            request_id=rid,
            prompt_token_ids=ids,
            max_tokens=params.max_tokens,
            stop_token_ids=frozenset(stop_ids),
            min_tokens=params.min_tokens,
            priority=priority,
            tenant=tenant,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            max_model_len=self.max_model_len,
            cache_salt=cache_salt,
        )
        # Everything that can fail runs before the scheduler owns the request; undo the runner's part if the
        # scheduler refuses (e.g. a request that can never fit the pool), so a failure leaves nothing behind.
        self.add_sample_state(rid, params, stop_ids, ids)
        try:
            self.scheduler.add_request(req)
        except BaseException:
            self.runner.remove_requests([rid])
            raise
        if track_output:
            self.outputs.add(rid, ids, params, req.arrival_time)
        self.num_prompt_tokens += len(ids)
        return rid

    def add_sample_state(self, request_id: str, params: SamplingParams, stop_token_ids: Iterable[int],
                         prompt_token_ids: list[int]) -> None:
        """The runner's per-request sampling state (``stop_token_ids``: the ids masked until ``min_tokens``)."""
        stop_for_min: tuple[int, ...] = ()
        if params.min_tokens:
            stop_for_min = tuple(sorted(t for t in stop_token_ids if 0 <= t < self.model_config.vocab_size))
        self.runner.add_request(request_id, params, stop_for_min, prompt_token_ids)

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.abort_requests(ids)
        return [o for o in map(self.outputs.abort, ids) if o is not None]

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a live request's priority (lower is more urgent); it counts from the next step.

        Returns False when no such request is live (unknown, finished or aborted)."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidParameterError("priority", f"priority must be an integer, got {priority!r}")
        return self.scheduler.set_priority(request_id, priority)

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or KV copies still in flight (an aborted request's blocks stay pinned until its copy
        lands: the engine is not idle before that)."""
        return self.scheduler.has_unfinished_requests() or self.scheduler.has_transfers_in_flight()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One scheduling decision, one forward pass. Returns the requests that got a token this step.

        A failure that belongs to one request (its sampling, its detokenization) aborts that request alone:
        its output has finish_reason "abort" and ``error`` set. Failures of the forward pass itself propagate.
        """
        outputs = []
        t0 = time.perf_counter()
        now = time.monotonic()
        for ev in self.step_events():
            if ev.request_id not in self.outputs:
                continue
            out, ended_here = self.outputs.apply(ev, now)
            if ended_here:   # a stop string, or detokenizing failed (then it is an abort): the scheduler stops it
                self.scheduler.finish_requests([ev.request_id], RequestStatus(out.finish_reason))
            if out is not None:
                outputs.append(out)
        if self._step_log is not None and self.last_decision.chunks:
            self._step_log.write(t0, time.perf_counter() - t0, self.last_decision)
        return outputs

    def step_events(self) -> list[TokenEvent]:
        """One scheduling decision, one forward pass; each request's news as token ids (no text). A request
        whose sampling failed is aborted here and reported with ``error`` set."""
        out = self.last_decision = self.scheduler.schedule()
        if self.config.check_invariants:
            self.scheduler.check_output(out)
        if out.finished:
            # An id reused right after its request finished is live again, and its runner state is the new
            # request's: the runner must not forget it.
            out.finished = [rid for rid in out.finished if rid not in self.scheduler.requests]
        results = self.runner.execute(out)
        # Overlapped KV transfers that landed meanwhile; with nothing to compute, wait for one rather than spin.
        landed = self.runner.poll_transfers(block=not out.chunks and self.scheduler.has_transfers_in_flight())
        self.num_steps += 1
        events = []
        failed = {rid: self._sample_error(rid) for rid, (tok, _) in results.items() if tok == SAMPLE_FAILED}
        if failed:
            # Abort them before update_from_output, which then skips them: no bogus token is appended.
            for rid, err in failed.items():
                log.error("request %s: %s; aborting it", rid, err)
            self.scheduler.abort_requests(list(failed))
            events.extend(TokenEvent(rid, -1, finish_reason="abort", error=err) for rid, err in failed.items())
        touched = self.scheduler.update_from_output(
            out, {rid: tok for rid, (tok, _) in results.items() if rid not in failed}, landed
        )
        for req in touched:
            tok, lp = results[req.request_id]
            status = req.status
            events.append(TokenEvent(
                req.request_id, tok, lp, status.value if status.finished else None,
                hide=status is RequestStatus.FINISHED_STOPPED and tok in req.stop_token_ids,
                num_cached_tokens=req.num_cached_tokens, position=req.num_output_tokens - 1,
            ))
        self.num_generated_tokens += len(touched)
        if self.config.check_invariants:
            self.scheduler.check_invariants()
        return events

    def _capture_decode_graphs(self, max_batch: int) -> None:
        """CUDA graphs for decode-only steps of up to ``max_batch`` requests; eager, with a warning, where the
        attention kernel they need is missing or the capture is refused."""
        if self.runner.model.attn_backend != "triton":
            log.warning("decode CUDA graphs need the Triton attention kernel; running eagerly")
            return
        print(f"tokenyard: capturing decode CUDA graphs (batch sizes up to {max_batch}) ...", file=sys.stderr,
              flush=True)
        try:
            self.runner.enable_decode_graphs(max_batch)
        except Exception as e:  # noqa: BLE001 - a capture this setup refuses: serve eagerly
            log.warning("decode CUDA graph capture failed (%s); running eagerly (--enforce-eager skips the attempt)",
                        e)
            self.runner.graphs = None
            torch.cuda.synchronize(self.runner.device)

    def _blocks_from_gpu_memory(self, per_block: int) -> int:
        """KV blocks that fit in ``gpu_memory_utilization`` of the GPU once the weights, a profiling step at the
        full token budget, memory outside torch (CUDA context, other processes) and a reserve for the decode
        graphs are counted (vLLM's accounting)."""
        cfg = self.config
        dev = self.runner.device
        peak = self.runner.profile_peak_bytes(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        free, total = torch.cuda.mem_get_info(dev)
        outside_torch = (total - free) - torch.cuda.memory_reserved(dev)
        graph_reserve = 0 if cfg.enforce_eager else 512 * 2**20
        budget = int(total * cfg.gpu_memory_utilization) - peak - outside_torch - graph_reserve
        if budget < per_block:
            raise ValueError(
                f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves no room for the KV cache: "
                f"{total / 2**30:.1f} GiB GPU, weights and activations peak at {peak / 2**30:.1f} GiB, "
                f"{outside_torch / 2**30:.1f} GiB used outside torch; raise it or pass --num-kv-blocks")
        blocks = budget // per_block
        # More than every seat filled to the context window can ever use only caches prefixes, and a pool of
        # millions of blocks (a small model on a large GPU) costs the bookkeeping time and memory for nothing.
        most = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        if blocks > most:
            log.info("KV cache: %d blocks would fit; %d (max_num_seqs x max_model_len) are all that can be used",
                     blocks, most)
            blocks = most
        log.info("KV cache: %d blocks (%.1f GiB) from gpu_memory_utilization=%.2f", blocks,
                 blocks * per_block / 2**30, cfg.gpu_memory_utilization)
        return blocks

    def step_log_header(self) -> dict:
        """What a step log (and a profile) records of this engine."""
        dev = self.runner.device
        return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu: {cpu_name()}",
                "threads": torch.get_num_threads(), "torch": torch.__version__, "model": self.model_name,
                "dtype": str(self.runner.dtype), "quantization": self.quantization,
                "block_size": self.config.block_size, "num_kv_blocks": self.kv.pool.num_blocks,
                "max_num_batched_tokens": self.config.max_num_batched_tokens,
                "max_num_seqs": self.config.max_num_seqs, "max_model_len": self.max_model_len}

    def _sample_error(self, rid: str) -> str:
        state = self.runner.states.get(rid)
        return (state.error if state is not None else None) or "sampling failed"

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, float]:
        s = self.scheduler
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "num_swapped": len(s.swapped),
            "kv_blocks_used": self.kv.num_used_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_blocks_total": self.kv.pool.num_blocks,
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "host_prefix_hit_tokens": self.kv.host_prefix_hits,
            "swap_out_bytes": self.kv.swap_out_blocks * self.kv_block_bytes,
            "swap_in_bytes": self.kv.swap_in_blocks * self.kv_block_bytes,
            "swap_copies": self.kv.swap_copies,
            "swap_out_reused_blocks": self.kv.swap_out_reused_blocks,
            "num_swapping": len(s.in_flight),
            "prompt_tokens": self.num_prompt_tokens,
            "generated_tokens": self.num_generated_tokens,
        }

    def tenant_stats(self) -> dict[str, tuple[float, float]]:
        """Per tenant: (service, virtual counter). Service is w_p per prompt token + w_q per output token,
        counted for every policy; the counter is service / weight plus VTC's lifts."""
        return self.scheduler.ledger.tenant_stats()
