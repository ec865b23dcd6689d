"""The engine: validates requests, runs scheduler step -> model runner -> outputs, and frees what ends."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from tokenyard.config import EngineConfig
from tokenyard.engine.kv_store import KVStore
from tokenyard.engine.model_runner import ModelRunner
from tokenyard.engine.sampler import SAMPLE_FAILED
from tokenyard.kv.manager import KVCacheManager
from tokenyard.model.config import ModelConfig
from tokenyard.model.loader import load_state_dict, read_hf_config, resolve_model
from tokenyard.model.tokenizer import IncrementalDetokenizer, Tokenizer
from tokenyard.outputs import RequestOutput, TokenLogprob
from tokenyard.sampling_params import InvalidParameterError, SamplingParams
from tokenyard.sched.request import Request, RequestStatus
from tokenyard.sched.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Tracked:
    req: Request
    params: SamplingParams
    detok: IncrementalDetokenizer
    out: RequestOutput
    max_stop_len: int


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
        dtype = _DTYPES[config.dtype]
        per_block = KVStore.bytes_per_block(mc, config.block_size, dtype)
        num_blocks = config.num_kv_blocks or max(int(config.kv_cache_memory_gb * 2**30) // per_block, 1)
        if config.num_host_blocks is not None:
            num_host = config.num_host_blocks
        else:
            num_host = int(config.swap_space_gb * 2**30) // per_block if config.preemption_mode == "swap" else 0
        self.runner = ModelRunner(
            mc, load_state_dict(resolved.hf_dir), num_blocks=num_blocks, block_size=config.block_size,
            num_host_blocks=num_host, max_model_len=self.max_model_len, device=device, dtype=dtype,
        )
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
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.load_time_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ requests
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Prompt text or token ids -> validated token ids (ValueError naming `prompt` otherwise)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt", "prompt must not be empty")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise InvalidParameterError("prompt", "prompt token ids must be integers")
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidParameterError(
                    "prompt", f"prompt token id {bad[0]} outside the vocabulary [0, {self.model_config.vocab_size})"
                )
        else:
            raise InvalidParameterError("prompt", f"prompt must be a string or a list of token ids, got {type(prompt)}")
        if not ids:
            raise InvalidParameterError("prompt", "prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidParameterError(
                "prompt",
                f"prompt has {len(ids)} tokens but the model's context window is {self.max_model_len} "
                f"(at least one token must be left to generate)",
            )
        return ids

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
    ) -> str:
        """Validate and queue a request. Raises ValueError before any state changes.

        ``cache_salt``: only requests with the same salt share prefix-cache blocks (a tenant's privacy)."""
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
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidParameterError(
                "max_tokens", f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}, but the "
                              f"model's context window is {self.max_model_len}: ask for at most "
                              f"{self.max_model_len - len(ids)} tokens")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._tracked:
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
        out = RequestOutput(request_id=rid, prompt_token_ids=ids, logprobs=[] if params.logprobs is not None else None)
        out.metrics["arrival_time"] = req.arrival_time
        tracked = _Tracked(
            req, params, IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens), out,
            max((len(s) for s in params.stop), default=0),
        )
        # Everything that can fail runs before the scheduler owns the request; undo the runner's part if the
        # scheduler refuses (e.g. a request that can never fit the pool), so a failure leaves nothing behind.
        stop_for_min = ()
        if params.min_tokens:
            stop_for_min = tuple(sorted(t for t in stop_ids if 0 <= t < self.model_config.vocab_size))
        self.runner.add_request(rid, params, stop_for_min, ids)
        try:
            self.scheduler.add_request(req)
        except BaseException:
            self.runner.remove_requests([rid])
            raise
        self._tracked[rid] = tracked
        self.num_prompt_tokens += len(ids)
        return rid

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.abort_requests(ids)
        outs = []
        for rid in ids:
            t = self._tracked.pop(rid, None)
            if t is not None:
                t.out.finish_reason = "abort"
                t.out.new_text, t.out.new_token_ids = "", []
                outs.append(t.out)
        return outs

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
        out = self.scheduler.schedule()
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
        outputs = []
        failed = {rid: self._sample_error(rid) for rid, (tok, _) in results.items() if tok == SAMPLE_FAILED}
        if failed:
            # Abort them before update_from_output, which then skips them: no bogus token is appended.
            for rid, err in failed.items():
                log.error("request %s: %s; aborting it", rid, err)
            self.scheduler.abort_requests(list(failed))
            outputs.extend(self._fail(rid, err) for rid, err in failed.items())
        touched = self.scheduler.update_from_output(
            out, {rid: tok for rid, (tok, _) in results.items() if rid not in failed}, landed
        )
        now = time.monotonic()
        for req in touched:
            try:
                outputs.append(self._process(req, *results[req.request_id], now))
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                log.exception("request %s failed after sampling; aborting it", req.request_id)
                self.scheduler.abort_requests([req.request_id])  # no-op if it already finished
                outputs.append(self._fail(req.request_id, f"detokenizing the output failed: {e!r}"))
        if self.config.check_invariants:
            self.scheduler.check_invariants()
        return outputs

    def _process(self, req: Request, tok: int, lp: TokenLogprob | None, now: float) -> RequestOutput:
        """Detokenize a request's new token, apply stop strings and update its output."""
        t = self._tracked[req.request_id]
        o = t.out
        self.num_generated_tokens += 1
        # What can fail (detokenization) runs first, so a failure leaves the output as it was.
        status = req.status
        hide = status is RequestStatus.FINISHED_STOPPED and tok in req.stop_token_ids
        delta = "" if hide else t.detok.add([tok])
        if t.params.stop and delta and req.num_output_tokens >= t.params.min_tokens:   # vLLM: none before
            cut = self._find_stop(t, delta)
            if cut is not None:
                delta = delta[: max(cut - (len(t.detok.text) - len(delta)), 0)]
                t.detok.text = t.detok.text[:cut]
                if not status.finished:
                    self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                    status = RequestStatus.FINISHED_STOPPED
        if "first_token_time" not in o.metrics:
            o.metrics["first_token_time"] = now
            o.num_cached_tokens = max(req.num_cached_tokens, 0)
        o.token_ids.append(tok)
        o.new_token_ids = [tok]
        if o.logprobs is not None and lp is not None:
            o.logprobs.append(lp)
        o.text = t.detok.text
        o.new_text = delta
        if status.finished:
            o.finish_reason = status.value
            o.metrics["finished_time"] = now
            del self._tracked[req.request_id]
        return o

    def _sample_error(self, rid: str) -> str:
        state = self.runner.states.get(rid)
        return (state.error if state is not None else None) or "sampling failed"

    def _fail(self, rid: str, error: str) -> RequestOutput:
        """Finish a request the engine had to abort; the scheduler must already have let go of it."""
        t = self._tracked.pop(rid)
        o = t.out
        o.finish_reason = RequestStatus.FINISHED_ABORTED.value
        o.error = error
        o.new_text, o.new_token_ids = "", []
        o.metrics["finished_time"] = time.monotonic()
        return o

    @staticmethod
    def _find_stop(t: _Tracked, delta: str) -> int | None:
        text = t.detok.text
        start = max(len(text) - len(delta) - t.max_stop_len + 1, 0)
        hits = [i for i in (text.find(s, start) for s in t.params.stop) if i >= 0]
        return min(hits) if hits else None

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
