"""Step logs: the engine's steps as they ran (shape and seconds), and the profile fitted to them. Pure Python.

``tokenyard serve --step-log FILE`` appends one JSON line per step; the first line of a run describes the engine.
``tokenyard profile --from-step-log FILE`` fits the same piecewise-linear cost model ``tokenyard profile`` fits to
its probes, but to steps taken under real serving: with the HTTP server, the streaming and the clients sharing
the machine, which a quiet probe does not see (on 2 cores, steps with prefill ran ~10% slower while serving).

A step's cost is the time from its start to the next step's start when the engine went straight on (the loop's
own overhead between steps belongs to the step), else its own duration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from tokenyard.sched.output import SchedulerOutput
from tokenyard.sim.cost import (
    DECODE_TERMS,
    MIXED_TERMS,
    PROFILE_KIND,
    StepShape,
    decode_features,
    fit_linear,
    mixed_features,
)

BACK_TO_BACK_S = 0.005   # a gap shorter than this between two steps is the loop's overhead, not idleness


class StepLog:
    """Appends a step per line: ``{"t": start, "s": seconds, "shape": [...]}`` (StepShape's fields in order)."""

    def __init__(self, path: str | Path, header: dict) -> None:
        self._f: TextIO = open(path, "a", buffering=1)
        self._f.write(json.dumps({"engine": header}) + "\n")

    def write(self, t0: float, seconds: float, out: SchedulerOutput) -> None:
        s = StepShape.of(out)
        self._f.write(f'{{"t": {t0:.6f}, "s": {seconds:.6f}, "shape": [{s.num_tokens}, {s.num_seqs}, '
                      f'{s.num_decodes}, {s.decode_context}, {s.prefill_attn}, {s.prefill_context}]}}\n')


def read_step_log(path: str | Path) -> tuple[dict, list[tuple[StepShape, float]]]:
    """The engine header (the last one: the log of the latest run) and every step's (shape, cost)."""
    header: dict = {}
    runs: list[list[tuple[float, float, StepShape]]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        if "engine" in rec:
            header = rec["engine"]
            runs.append([])
            continue
        if not runs:
            raise ValueError(f"{path}:{n}: a step before the engine's header line")
        runs[-1].append((float(rec["t"]), float(rec["s"]), StepShape(*rec["shape"])))
    out = []
    for steps in runs:
        for i, (t, s, shape) in enumerate(steps):
            cost = s
            if i + 1 < len(steps):
                nxt = steps[i + 1][0]
                if 0 <= nxt - (t + s) < BACK_TO_BACK_S:
                    cost = nxt - t
            out.append((shape, cost))
    return header, out


def fit_profile(samples: list[tuple[tuple, StepShape, float]], decode_knots: list[float],
                mixed_knots: list[float]) -> dict:
    """Fit both models to each group's median (grouped by the first element; the group's shape is that of its
    median sample). Returns the profile's ``decode``, ``mixed``, ``fit`` and ``samples`` parts."""
    groups: dict[tuple, list[tuple[float, StepShape]]] = {}
    for key, shape, dt in samples:
        groups.setdefault(key, []).append((dt, shape))
    med = []
    for runs in groups.values():   # the median (the lower one of an even count: a real measured step)
        runs.sort(key=lambda x: x[0])
        dt, shape = runs[(len(runs) - 1) // 2]
        med.append((shape, dt))
    dec = [(s, t) for s, t in med if s.decode_only]
    mix = [(s, t) for s, t in med if not s.decode_only]
    if len(dec) < len(decode_knots) + 1 or len(mix) < len(mixed_knots) + 4:
        raise ValueError(f"too few step shapes measured to fit ({len(dec)} decode, {len(mix)} with prefill)")
    dk, mk = len(decode_knots), len(mixed_knots)
    dcoef, derr = fit_linear([decode_features(s.num_seqs, s.decode_context, decode_knots) for s, _ in dec],
                             [t for _, t in dec])
    mcoef, merr = fit_linear([mixed_features(s, mixed_knots) for s, _ in mix], [t for _, t in mix])
    return {
        "decode": {"knots": decode_knots, "values": dcoef[:dk], **dict(zip(DECODE_TERMS, dcoef[dk:]))},
        "mixed": {"knots": mixed_knots, "values": mcoef[:mk], **dict(zip(MIXED_TERMS, mcoef[mk:]))},
        "fit": {"decode_shapes": len(dec), "decode_mean_rel_error": derr, "mixed_shapes": len(mix),
                "mixed_mean_rel_error": merr},
        "samples": [{"shape": [s.num_tokens, s.num_seqs, s.num_decodes, s.decode_context, s.prefill_attn,
                               s.prefill_context], "seconds": t} for s, t in med],
    }


def knots_from(values: list[int], candidates: list[int], cap: int) -> list[float]:
    """The candidate knots inside the range of what was observed (at least the two ends)."""
    lo, hi = min(values), min(max(values), cap)
    ks = sorted({float(k) for k in candidates if lo <= k <= hi} | {float(lo), float(hi)})
    return ks


def profile_from_step_log(paths: list[str | Path], base: dict | None = None) -> dict:
    """A profile fitted to logged serving steps (copies taken from ``base``, a probe profile, when given)."""
    header: dict = {}
    samples: list[tuple[tuple, StepShape, float]] = []
    for path in paths:
        h, steps = read_step_log(path)
        header = header or h
        for shape, cost in steps:
            samples.append(((len(samples),), shape, cost))
    if not samples:
        raise ValueError(f"no steps in {', '.join(map(str, paths))}")
    budget = int(header.get("max_num_batched_tokens", max(s.num_tokens for _, s, _ in samples)))
    dec = [s.num_seqs for _, s, _ in samples if s.decode_only]
    mix = [s.num_tokens for _, s, _ in samples if not s.decode_only]
    if not dec or not mix:
        raise ValueError("the log needs both decode-only steps and steps with prefill to fit")
    fitted = fit_profile(samples, knots_from(dec, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], budget),
                         knots_from(mix, [8, 32, 64, 128, 256, 512, 1024, 2048, 4096], budget))
    data = {"kind": PROFILE_KIND, "version": 2, "source": "step log: " + ", ".join(map(str, paths)),
            **{k: header.get(k) for k in ("device", "threads", "torch", "model", "dtype", "quantization",
                                          "block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs",
                                          "max_model_len")},
            "copies": (base or {}).get("copies", {}), **fitted}
    if data["block_size"] is None:
        raise ValueError("the step log has no engine header with its block size")
    return data


def summary_line(data: dict) -> str:
    f = data["fit"]
    return (f"decode {f['decode_mean_rel_error'] * 100:.1f}% mean error over {f['decode_shapes']} shapes, with "
            f"prefill {f['mixed_mean_rel_error'] * 100:.1f}% over {f['mixed_shapes']}")

