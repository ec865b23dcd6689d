"""``tokenyard profile``: measure the real engine on this machine and write a cost model for the simulator.

Every step of a set of probe workloads is timed whole (``LLMEngine.step()``: scheduling, the forward pass,
sampling, detokenization, as the server's loop runs it) together with the shape of the scheduler's decision.
Two models are fitted to each probe step's median (decode-only steps and steps with prefill run different code
paths; ``sim/steplog.py``'s fit):

- decode-only: a piecewise-linear function of the sequences (knots at the measured batch sizes) + c * keys read;
- with prefill: a piecewise-linear function of the tokens (knots at the measured chunk sizes) + costs per
  sequence, decode key, prefill query-key pair and prefill key.

Copies are timed too: a swap of n blocks between device and host (``KVStore.copy``) and a migration's read and
write of n blocks (``MigrationEndpoint``'s numpy path, without the transport between processes).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenyard.config import EngineConfig
from tokenyard.engine.llm_engine import LLMEngine
from tokenyard.sampling_params import SamplingParams
from tokenyard.sim.cost import PROFILE_KIND, StepShape
from tokenyard.sim.steplog import fit_profile, summary_line


@dataclass(frozen=True)
class Probes:
    """The step shapes measured: decode batches at contexts, prompts prefilled beside decoding requests."""

    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (32, 256, 1024)
    prefill_lengths: tuple[int, ...] = (8, 32, 128, 256, 512, 1024)
    prefill_background: tuple[int, ...] = (0, 8, 32)
    max_probe_tokens: int = 16384   # prompt tokens one decode probe prefills at most (a CPU needs minutes more)


class Profiler:
    def __init__(self, engine: LLMEngine, log: Callable[[str], None] = print, repeats: int = 5) -> None:
        self.engine = engine
        self.log = log
        self.repeats = repeats
        self.samples: list[tuple[tuple, StepShape, float]] = []   # (probe and step in it, shape, seconds)
        self.rng = np.random.default_rng(0)
        self._n = 0
        vocab = engine.model_config.vocab_size
        self._vocab = min(vocab, 30000)

    def _prompt(self, n: int) -> list[int]:
        return [int(x) for x in self.rng.integers(min(100, self._vocab // 2), self._vocab, n)]

    def _add(self, prompt_len: int, max_tokens: int) -> str:
        self._n += 1
        rid = f"profile-{self._n}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(self._prompt(prompt_len), params, request_id=rid)
        return rid

    def _step(self) -> tuple[StepShape, float]:
        """One engine step: the shape of its decision and its wall time."""
        t0 = time.perf_counter()
        self.engine.step()
        return StepShape.of(self.engine.last_decision), time.perf_counter() - t0

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def decode(self, batch: int, context: int) -> None:
        """``batch`` requests decoding at about ``context`` keys each: prefill them untimed, then time decodes."""
        budget = self.engine.config.max_num_batched_tokens
        if batch > self.engine.config.max_num_seqs or batch > budget:
            return
        for _ in range(batch):
            self._add(context, self.repeats + 2)
        while True:   # until every request has its first token (prefill done)
            shape, _ = self._step()
            if shape.decode_only:
                break
        for _ in range(self.repeats):
            shape, dt = self._step()
            if shape.decode_only and shape.num_seqs == batch:
                self.samples.append((("decode", batch, context), shape, dt))
        self._drain()

    def prefill(self, length: int, background: int) -> None:
        """One prompt of ``length`` tokens prefilled beside ``background`` decoding requests; every step with
        prefill work is a sample."""
        keep = max(self.engine.max_model_len - 64 - 1, 1)
        for _ in range(background):
            self._add(64, keep)
        while background:
            shape, _ = self._step()
            if shape.decode_only:
                break
        for _ in range(self.repeats):
            rid = self._add(length, 1)
            chunk = 0
            while rid in self.engine.scheduler.requests:
                shape, dt = self._step()
                if not shape.decode_only:
                    self.samples.append((("prefill", length, background, chunk), shape, dt))
                    chunk += 1
        self.engine.abort_request(list(self.engine.scheduler.requests))
        self._drain()

    def run(self, probes: Probes) -> None:
        cfg = self.engine.config
        ctxs = [c for c in probes.decode_contexts if c + self.repeats + 4 <= self.engine.max_model_len]
        for b in probes.decode_batches:
            for c in ctxs:
                if c != ctxs[0] and b * c > probes.max_probe_tokens:
                    continue   # the context term is fitted from the smaller batches
                self.log(f"decode: {b} requests at {c} tokens")
                self.decode(b, c)
        for n in probes.prefill_lengths:
            if n + 2 > self.engine.max_model_len:
                continue
            for bg in probes.prefill_background:
                if bg >= cfg.max_num_seqs:
                    continue
                self.log(f"prefill: {n} tokens beside {bg} decodes")
                self.prefill(n, bg)

    # ------------------------------------------------------------------ copies
    def copies(self) -> dict[str, float]:
        """Swap speed (a run of n blocks as one copy, and n single-block copies, device to host) on a probe store
        of the engine's block shape, dtype and device, whatever the engine's own swap space."""
        from tokenyard.engine.kv_store import KVStore

        out: dict[str, float] = {}
        kv = self.engine.kv
        n = 64
        runner = self.engine.runner
        store = KVStore(runner.cfg, num_blocks=n, num_host_blocks=n, block_size=runner.block_size,
                        device=runner.device, dtype=runner.dtype)
        sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)

        def timed(segments):
            def go():
                store.copy(segments, to_host=True)
                sync()
            return _median_time(go)

        t_one = timed([(0, 0, n)])
        t_many = timed([(i, i, 1) for i in range(n)])
        out["swap_s_per_block"] = t_one / n
        out["swap_s_per_copy"] = max((t_many - t_one) / (n - 1), 0.0)
        from tokenyard.engine.migration import MigrationEndpoint

        ep = MigrationEndpoint(self.engine)
        ids = list(range(min(64, kv.pool.num_blocks)))
        data = ep._read(ids)
        t_read = _median_time(lambda: ep._read(ids))
        t_write = _median_time(lambda: ep._write(ids, data))
        out["migration_s_per_block"] = (t_read + t_write) / len(ids)
        out["migration_s_per_stage"] = 0.0
        return out


def _median_time(fn: Callable[[], object], n: int = 7) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def knots_for(config: EngineConfig, probes: Probes) -> tuple[list[float], list[float]]:
    """Knots at the batch sizes and token counts the probes measure."""
    cap = min(config.max_num_seqs, config.max_num_batched_tokens)
    dec = sorted({float(b) for b in probes.decode_batches if b <= cap})
    budget = config.max_num_batched_tokens   # a step never has more tokens: the last knot
    mix = sorted({float(min(n, budget)) for n in probes.prefill_lengths} | {float(budget)})
    return dec, mix


def profile(config: EngineConfig, out_path: str | Path, repeats: int = 5,
            log: Callable[[str], None] | None = None, probes: Probes | None = None) -> dict:
    say = log or (lambda m: print(f"tokenyard profile: {m}", file=sys.stderr, flush=True))
    say(f"loading {config.model or 'the bundled SmolLM2-135M-Instruct'} ...")
    engine = LLMEngine(config)
    prof = Profiler(engine, say, repeats)
    say("warming up ...")
    probes = probes or Probes()
    prof.decode(min(4, config.max_num_seqs), 32)
    prof.samples.clear()
    t0 = time.perf_counter()
    prof.run(probes)
    say(f"{len(prof.samples)} steps timed in {time.perf_counter() - t0:.0f} s; timing KV copies ...")
    copies = prof.copies()
    fitted = fit_profile(prof.samples, *knots_for(config, probes))
    data = {"kind": PROFILE_KIND, "version": 2, "source": "tokenyard profile probes", **engine.step_log_header(),
            "copies": copies, **fitted}
    Path(out_path).write_text(json.dumps(data, indent=1))
    say(f"fit: {summary_line(data)}; wrote {out_path}")
    return data
