"""``tokenyard bench serve | capacity`` flags. Registered by tokenyard/cli.py; imports nothing heavy until run."""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from tokenyard.bench.runner import serve

    return serve(args)


def _capacity(args: argparse.Namespace) -> int:
    from tokenyard.bench.capacity import capacity

    return capacity(args)


def _common(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", default=None, help="model name to ask for (default: the server's first, /v1/models)")
    s.add_argument("--endpoint", choices=["completions", "chat"], default=None,
                   help="/v1/completions or /v1/chat/completions (default: completions; chat with --multi-turn)")
    s.add_argument("--api-key", default=None, help="sent as a Bearer token (or set $TOKENYARD_API_KEY)")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds without a byte from the server")
    s.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    s.add_argument("--warmup", type=int, default=1, help="short unmeasured requests sent before the run")
    add_workload_args(p)
    add_output_args(p)


def add_workload_args(p: argparse.ArgumentParser, client: bool = True) -> None:
    """Lengths and seed (``client``: also the flags only a real server needs: EOS handling, the tokenizer)."""
    w = p.add_argument_group("workload")
    w.add_argument("--input-len", default="128", help="prompt tokens: N, or A:B for a range")
    w.add_argument("--output-len", default="64", help="output tokens (max_tokens): N, or A:B for a range")
    w.add_argument("--length-dist", choices=["uniform", "zipf"], default="uniform",
                   help="how A:B ranges are sampled")
    w.add_argument("--zipf-a", type=float, default=1.2, help="Zipf exponent for --length-dist zipf")
    if client:
        w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="generate exactly the requested output length")
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the gaps: 1 is Poisson, <1 burstier (CV = 1/sqrt(burstiness))")
    if client:
        w.add_argument("--tokenizer", default=None,
                       help="HF tokenizer directory of the served model (default: the bundled SmolLM2's)")
    w.add_argument("--seed", type=int, default=0)


def add_output_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """--result-json and --label (``progress``: also the progress bar of a run that takes real time)."""
    o = p.add_argument_group("output")
    o.add_argument("--result-json", default=None, help="write config, summary and per-request records here")
    o.add_argument("--label", default=None, help="a name for this run, kept in the report")
    if progress:
        o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: when stderr is a terminal)")


def add_load_args(p: argparse.ArgumentParser, num_prompts_help: str) -> None:
    """Arrivals, tenants, priorities, SLOs and trace replay: what ``bench serve`` sends and ``simulate`` replays."""
    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=int, default=None, help=num_prompts_help)
    g.add_argument("--request-rate", default="inf", help="requests per second, or inf for all at once")
    g.add_argument("--multi-turn", type=int, default=1,
                   help="K turns per conversation; turn i+1 = turn i's prompt + answer + new text, sent after it")
    g.add_argument("--tenants", type=int, default=1, help="tenants (the request's `user`)")
    g.add_argument("--tenant-weights", default=None,
                   help="share of the requests per tenant, e.g. 1,1,2 (default: equal)")
    g.add_argument("--tenant-service-weights", default=None,
                   help="VTC weights dividing each tenant's service in the fairness metric (default: 1 each)")
    g.add_argument("--w-p", type=float, default=1.0, help="service per prompt token (VTC's w_p)")
    g.add_argument("--w-q", type=float, default=2.0, help="service per output token (VTC's w_q)")
    g.add_argument("--priorities", default=None, help="priorities to send, e.g. 0,1,2 (lower is more urgent)")
    g.add_argument("--priority-per", choices=["request", "tenant"], default="request",
                   help="drawn per request, or tenant i gets the i-th priority")
    g.add_argument("--slo", nargs="+", default=None, metavar="KEY:MS",
                   help="goodput SLOs in ms: ttft:MS tpot:MS e2e:MS")
    t = p.add_argument_group("trace replay")
    t.add_argument("--trace", default=None, help="Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    t.add_argument("--trace-start", type=int, default=0, help="first data row to replay (0-based)")
    t.add_argument("--trace-time-scale", type=float, default=1.0, help="multiply the gaps (10 = ten times slower)")
    t.add_argument("--trace-length-scale", type=float, default=1.0, help="multiply the prompt and output lengths")
    t.add_argument("--max-input-len", type=int, default=None, help="clamp traced prompt lengths")
    t.add_argument("--max-output-len", type=int, default=None, help="clamp traced output lengths")
    p.add_argument("--plot", default=None, help="write a PNG: CDFs of TTFT, TPOT, E2E (and service per tenant)")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark a running OpenAI-compatible server")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    serve = bsub.add_parser("serve", help="send a workload (synthetic or a trace) and report latency and throughput",
                            formatter_class=fmt)
    _common(serve)
    add_load_args(serve, "requests to send (default 100; with --trace, the rest of the trace)")
    serve.add_argument("--priority-churn", type=float, default=None, metavar="SECONDS",
                       help="every SECONDS, give each request in flight a new priority drawn from --priorities "
                            "(default 0,1,2,3) through POST /v1/requests/{id}/priority: context switches under load")
    serve.set_defaults(func=_serve)

    cap = bsub.add_parser("capacity", formatter_class=fmt,
                          help="binary-search the largest request rate whose P99 TBT meets an SLO")
    _common(cap)
    c = cap.add_argument_group("search")
    c.add_argument("--slo", nargs="+", required=True, metavar="KEY:MS",
                   help="tbt:MS (P99 inter-token gap) and optionally ttft:MS (median TTFT)")
    c.add_argument("--min-rate", type=float, default=0.1, help="requests per second")
    c.add_argument("--max-rate", type=float, default=10.0, help="requests per second")
    c.add_argument("--probes", type=int, default=6, help="short runs in all, the two ends included")
    c.add_argument("--num-prompts", type=int, default=32, help="requests per probe")
    cap.set_defaults(func=_capacity)
