"""``tokenyard bench serve``: workload -> prompts -> preflight and warm-up -> timed run -> metrics -> report.

Whatever goes wrong (an unreachable server, errors from it, a malformed trace, Ctrl-C) ends in one clear line
on stderr and a report of what was measured; the exit status is non-zero when nothing succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from tokenyard.bench import metrics
from tokenyard.bench.arrivals import parse_rate
from tokenyard.bench.client import BenchError, Target, list_models, make_client, run_chains, send
from tokenyard.bench.prompts import PromptBuilder, load_tokenizer, request_body
from tokenyard.bench.records import RequestRecord
from tokenyard.bench.report import RunProgress, first_errors, plot, print_summary, write_json
from tokenyard.bench.traces import parse_trace, trace_requests
from tokenyard.bench.workload import (
    LengthDist,
    RequestSpec,
    assign_priorities,
    assign_tenants,
    chains,
    parse_floats,
    parse_priorities,
    seeded,
    synthetic,
    tenant_names,
)

DEFAULT_NUM_PROMPTS = 100


def say(msg: str) -> None:
    print(f"tokenyard bench: {msg}", file=sys.stderr, flush=True)


@dataclass
class Workload:
    specs: list[RequestSpec]
    tenants: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)     # facts for the report (trace window, its error)


# --------------------------------------------------------------------------- building blocks
def target_from_args(args: argparse.Namespace, endpoint: str | None = None) -> Target:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be at least 1, got {args.max_concurrency}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout: must be positive, got {args.request_timeout}")
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url: {args.base_url!r} must start with http:// or https://")
    return Target(base_url=args.base_url.rstrip("/"), endpoint=endpoint or args.endpoint or "completions",
                  model=args.model, api_key=args.api_key or os.environ.get("TOKENYARD_API_KEY"),
                  ignore_eos=args.ignore_eos, request_timeout=args.request_timeout,
                  max_concurrency=args.max_concurrency, priority_churn_s=_churn(args))


def _churn(args: argparse.Namespace) -> tuple[float, list[int]] | None:
    every = getattr(args, "priority_churn", None)
    if every is None:
        return None
    if not every > 0:
        raise ValueError(f"--priority-churn: must be a positive number of seconds, got {every}")
    return every, parse_priorities(args.priorities) or [0, 1, 2, 3]


def lengths_from_args(args: argparse.Namespace) -> tuple[LengthDist, LengthDist]:
    return (LengthDist.parse(args.input_len, "--input-len", args.length_dist, args.zipf_a),
            LengthDist.parse(args.output_len, "--output-len", args.length_dist, args.zipf_a))


def build_workload(args: argparse.Namespace) -> Workload:
    """Synthetic or traced requests, with tenants and priorities assigned. Bad flags raise ValueError."""
    notes: dict = {}
    if args.trace:
        if args.multi_turn > 1:
            raise ValueError("--multi-turn cannot be combined with --trace (a trace row is one request)")
        if args.trace_start < 0:
            raise ValueError(f"--trace-start: must be at least 0, got {args.trace_start}")
        if args.num_prompts is not None and args.num_prompts < 1:
            raise ValueError(f"--num-prompts: must be at least 1, got {args.num_prompts}")
        for flag, v in (("--max-input-len", args.max_input_len), ("--max-output-len", args.max_output_len)):
            if v is not None and v < 1:
                raise ValueError(f"{flag}: must be at least 1, got {v}")
        limit = None if args.num_prompts is None else args.trace_start + args.num_prompts
        parsed = parse_trace(args.trace, limit=limit)
        rows = parsed.rows[args.trace_start:]
        notes["trace"] = {"path": str(args.trace), "start": args.trace_start, "rows": len(rows),
                          "first_line": rows[0].line if rows else None, "last_line": rows[-1].line if rows else None}
        if parsed.error is not None:
            notes["trace_error"] = str(parsed.error)
            if rows:
                say(f"{parsed.error}; replaying the {len(rows)} rows before it")
        if not rows:
            if parsed.error is not None:
                raise BenchError(str(parsed.error))
            raise BenchError(f"trace {args.trace}: no rows at or after --trace-start {args.trace_start} "
                             f"(it has {len(parsed.rows)})")
        traced = trace_requests(rows, args.trace_time_scale, args.trace_length_scale,
                                args.max_input_len, args.max_output_len)
        specs = [RequestSpec(i, t.input_len, t.output_len, t.arrival_s) for i, t in enumerate(traced)]
    else:
        in_dist, out_dist = lengths_from_args(args)
        rate = parse_rate(args.request_rate)
        n = DEFAULT_NUM_PROMPTS if args.num_prompts is None else args.num_prompts
        specs = synthetic(n, in_dist, out_dist, rate, args.burstiness, args.multi_turn, args.seed)
    if args.tenants < 1:
        raise ValueError(f"--tenants: must be at least 1, got {args.tenants}")
    tenants = tenant_names(args.tenants)
    g = seeded(args.seed, "tenant", "priority")
    assign_tenants(specs, tenants, parse_floats(args.tenant_weights, "--tenant-weights", args.tenants), g["tenant"])
    priorities = parse_priorities(args.priorities)
    if priorities:
        assign_priorities(specs, priorities, args.priority_per, tenants, g["priority"])
    return Workload(specs, tenants, notes)


def build_texts(builder: PromptBuilder, specs: list[RequestSpec], endpoint: str, seed: int) -> dict[int, str]:
    """Prompt text per request (a chat first turn leaves room for the template around it). Built before the run."""
    rng = seeded(seed, "prompts")["prompts"]
    overhead = builder.chat_overhead() if endpoint == "chat" else 0
    out = {}
    for s in specs:
        n = s.input_len
        if endpoint == "chat" and s.turn == 0:
            n = max(builder.num_special + 1, n - overhead)
        out[s.index] = builder.text(max(n, builder.num_special + 1), rng)
    return out


def records_for(specs: list[RequestSpec]) -> dict[int, RequestRecord]:
    return {s.index: RequestRecord(s.index, s.input_len, s.output_len, s.tenant, s.priority, s.conversation,
                                   s.turn, s.arrival_s) for s in specs}


def resolve_model(target: Target) -> str | None:
    """Reach the server (GET /v1/models); the model to ask for is --model or the server's first."""
    async def go() -> list[str]:
        async with make_client(target) as client:
            return await list_models(client, target.base_url)

    served = asyncio.run(go())
    if target.model is None:
        if not served:
            raise BenchError(f"{target.base_url}/v1/models lists no model; pass --model")
        return served[0]
    if served and target.model not in served:
        say(f"warning: the server lists {', '.join(served)}, not {target.model!r}")
    return target.model


def warmup(target: Target, builder: PromptBuilder, n: int) -> None:
    """A few short requests before timing starts (first-use costs: kernel builds, allocations); not measured."""
    if n <= 0:
        return
    rng = np.random.default_rng(12345)
    text = builder.text(builder.num_special + 8, rng)
    prompt = [{"role": "user", "content": text}] if target.endpoint == "chat" else text

    async def go() -> list[RequestRecord]:
        recs = [RequestRecord(-1 - i, 8, 4) for i in range(n)]
        async with make_client(target) as client:
            for rec in recs:
                await send(client, target, request_body(target.endpoint, target.model, prompt, 4, True), rec, 0.0)
        return recs

    for rec in asyncio.run(go()):
        if not rec.ok:
            if rec.error_kind == "connect":
                raise BenchError(rec.error)
            say(f"warning: warm-up request failed ({rec.error_kind}: {rec.error})")
            return


def execute(target: Target, specs: list[RequestSpec], texts: dict[int, str], records: dict[int, RequestRecord],
            progress: bool | None = None, label: str = "requests") -> bool:
    """Run the workload; True if it was interrupted (Ctrl-C). Records hold whatever was measured either way."""
    with RunProgress(len(specs), label, enabled=progress) as prog:
        try:
            gave_up = asyncio.run(run_chains(target, chains(specs), texts, records, prog.done,
                                             on_sent=prog.sent))
        except KeyboardInterrupt:
            return True
    if target.priority_churn_s is not None:
        say(f"priority churn: {target.priority_changes} priority changes sent")
    if gave_up:
        say(f"stopped early: {gave_up} (is the server still running at {target.base_url}?)")
    return False


def length_mismatch(records: list[RequestRecord], endpoint: str) -> str | None:
    """A warning when the server counted other prompt lengths than asked (the wrong --tokenizer, usually)."""
    bad = []
    for r in records:
        if not r.ok or r.turn != 0 or r.prompt_tokens is None:
            continue
        off = abs(r.prompt_tokens - r.input_len)
        if (endpoint == "completions" and off) or off > max(2, 0.1 * r.input_len):
            bad.append(r)
    if not bad:
        return None
    r = bad[0]
    return (f"warning: the server counted other prompt lengths than asked for {len(bad)} request(s) (e.g. asked "
            f"{r.input_len}, got {r.prompt_tokens}); pass --tokenizer with the served model's tokenizer")


def failure_line(summary: dict, records: list[RequestRecord]) -> str | None:
    if not summary["failed"]:
        return None
    sent = summary["completed"] + summary["failed"]
    kinds = ", ".join(f"{k}: {n}" for k, n in summary["failures"].items())
    examples = "; ".join(f"{k}: {m}" for k, m in first_errors([r for r in records if r.sent]).items())
    return f"{summary['failed']} of {sent} requests failed ({kinds}); {examples}"


# --------------------------------------------------------------------------- the command
def serve(args: argparse.Namespace) -> int:
    if args.multi_turn > 1 and args.endpoint is None:
        args.endpoint = "chat"  # a conversation is a chat: turn i+1 extends turn i's messages
    target = target_from_args(args)
    slo = metrics.parse_slo(args.slo or [])
    weights = parse_floats(args.tenant_service_weights, "--tenant-service-weights", args.tenants)
    records: dict[int, RequestRecord] = {}
    workload = Workload([])
    error: str | None = None
    interrupted = False
    try:
        workload = build_workload(args)
        records = records_for(workload.specs)
        target.model = resolve_model(target)
        builder = PromptBuilder(load_tokenizer(args.tokenizer))
        texts = build_texts(builder, workload.specs, target.endpoint, args.seed)
        warmup(target, builder, args.warmup)
        interrupted = execute(target, workload.specs, texts, records, args.progress)
    except BenchError as e:
        error = str(e)
        say(error)
    return finish(args, target, workload, records, slo, weights, error, interrupted)


@dataclass
class Analysis:
    """Everything measured of one run's records (bench serve and simulate report the same)."""

    summary: dict
    by_tenant: dict | None
    by_priority: dict | None
    timeline: metrics.ServiceTimeline | None
    fairness: dict | None


def analyse(args: argparse.Namespace, recs: list[RequestRecord], tenants: list[str], slo: dict[str, float],
            weights: list[float] | None) -> Analysis:
    summary = metrics.summary(recs, slo)
    multi = len(tenants) > 1
    timeline = fairness = None
    if multi:
        wmap = dict(zip(tenants, weights)) if weights else {}
        timeline = metrics.fairness(recs, wmap, args.w_p, args.w_q, tenants)
        fairness = {"w_p": args.w_p, "w_q": args.w_q, "tenant_service_weights": wmap or None,
                    **timeline.downsampled().to_json()}
    return Analysis(summary, metrics.by_group(recs, "tenant") if multi else None,
                    metrics.by_group(recs, "priority") if args.priorities else None, timeline, fairness)


def report_of(args: argparse.Namespace, a: Analysis, recs: list[RequestRecord], before: dict,
              after: dict | None = None) -> dict:
    """The JSON report: the flags, ``before`` (what ran), the analysis, ``after``, every request's record."""
    return {"label": args.label, "config": {k: v for k, v in vars(args).items() if k not in ("func", "api_key")},
            **before, "summary": a.summary, "errors": first_errors(recs), "by_tenant": a.by_tenant,
            "by_priority": a.by_priority, "fairness": a.fairness, **(after or {}),
            "requests": [r.to_json() for r in recs]}


def write_outputs(args: argparse.Namespace, report: dict, recs: list[RequestRecord], title: str,
                  timeline: metrics.ServiceTimeline | None, tell=say) -> None:
    """--result-json and --plot (a failed plot is said, not raised: it must not lose the run)."""
    if args.result_json:
        tell(f"wrote {write_json(args.result_json, report)}")
    if args.plot:
        try:
            tell(f"wrote {plot(args.plot, recs, title, timeline)}")
        except Exception as e:  # noqa: BLE001 - a failed plot must not lose the run
            tell(f"could not write the plot {args.plot}: {type(e).__name__}: {e}")


def finish(args: argparse.Namespace, target: Target, workload: Workload, records: dict[int, RequestRecord],
           slo: dict[str, float], weights: list[float] | None, error: str | None, interrupted: bool) -> int:
    recs = [records[s.index] for s in workload.specs]
    a = analyse(args, recs, workload.tenants, slo, weights)
    summary = a.summary
    if interrupted:
        summary["interrupted"] = True
    title = f"tokenyard bench serve{f' [{args.label}]' if args.label else ''}: {target.model or '?'} " \
            f"at {target.base_url}{target.url[len(target.base_url):]}"
    if recs and any(r.sent for r in recs):
        print_summary(summary, title, a.by_tenant, a.fairness, a.by_priority)
    for line in (length_mismatch(recs, target.endpoint), failure_line(summary, recs)):
        if line:
            say(line)
    if interrupted:
        say(f"interrupted: reporting the {summary['completed'] + summary['failed']} requests sent so far")
    report = report_of(args, a, recs, {
        "server": {"base_url": target.base_url, "model": target.model, "endpoint": target.endpoint},
        "workload": {"num_requests": len(recs), "tenants": workload.tenants, **workload.notes}, "error": error})
    write_outputs(args, report, recs, title, a.timeline)
    if interrupted:
        return 130
    return 0 if summary["completed"] > 0 and error is None else 1
