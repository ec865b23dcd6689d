"""``tokenyard simulate``: the workload ``tokenyard bench serve`` would send, run through the simulator instead of
a server; the same tables, JSON and plot, plus what the simulation itself cost. Imports no torch."""

from __future__ import annotations

import argparse
import sys
import time

from tokenyard.bench.cli_args import add_load_args, add_output_args, add_workload_args

DEFAULT_COST_MODEL = "vidur:h100:llama-2-7b"


def say(msg: str) -> None:
    print(f"tokenyard simulate: {msg}", file=sys.stderr, flush=True)


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    from tokenyard.cluster.dispatch import DISPATCH_POLICIES
    from tokenyard.sched.policies import POLICY_NAMES

    p = sub.add_parser("simulate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="run a workload or a trace through the real scheduler and cluster policies against a "
                            "cost model (a discrete-event simulation; no model, no GPU)")
    add_workload_args(p, client=False)
    add_load_args(p, "requests to simulate (default 100; with --trace, the rest of the trace)")
    add_output_args(p, progress=False)
    c = p.add_argument_group("cost model")
    c.add_argument("--cost-model", default=DEFAULT_COST_MODEL,
                   help="a `tokenyard profile` JSON file, vidur:DEVICE:MODEL (Vidur's measured GPU operators; "
                        "devices a100, h100, h200; models llama-2-7b, llama-3-8b, llama-2-70b) or "
                        "roofline:DEVICE:MODEL (MODEL may be a config.json)")
    c.add_argument("--vidur-profiles", default=None,
                   help="directory holding Vidur's compute/ profiles (default: ../shared/data/vidur-profiles)")
    c.add_argument("--step-overhead-ms", type=float, default=1.0,
                   help="GPU models: host time per step (scheduling, inputs, sampling) added to the kernels' time")
    e = p.add_argument_group("engine (per instance)")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step")
    e.add_argument("--max-num-seqs", type=int, default=256, help="running requests at most")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    e.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks per instance (default: the profile's, or what the GPU's memory holds)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="context window (default: the profile's engine's, else 4096)")
    e.add_argument("--scheduling-policy", "--policy", dest="scheduling_policy", default="fcfs",
                   choices=POLICY_NAMES, help="turn-level policy")
    e.add_argument("--vtc-tenant-weights", default=None,
                   help="the scheduler's VTC weights, e.g. 'tenant-0=2,tenant-1=1' (the engine's --tenant-weights; "
                        "here --tenant-weights is the share of requests per tenant, as in bench)")
    e.add_argument("--vtc-w-p", type=float, default=1.0, help="VTC service per prompt token")
    e.add_argument("--vtc-w-q", type=float, default=2.0, help="VTC service per output token")
    e.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute")
    e.add_argument("--num-host-blocks", type=int, default=0, help="host swap blocks (with --preemption-mode swap)")
    e.add_argument("--swap-overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="swaps copy beside the forward pass (FastSwitch) instead of before it")
    e.add_argument("--swap-block-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="allocate blocks in contiguous runs (a swap copies runs, not blocks)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("cluster")
    g.add_argument("--instances", type=int, default=1, help="engine instances behind the dispatcher")
    g.add_argument("--dispatch", default="freeness", choices=sorted(DISPATCH_POLICIES), help="where a request goes")
    g.add_argument("--migration", action=argparse.BooleanOptionalAction, default=True,
                   help="live-migrate running requests from the least free instances to the freest (Llumnix)")
    g.add_argument("--interval-s", type=float, default=0.05, help="how often the coordinator looks at the loads")
    g.add_argument("--priority-headroom", type=int, default=0,
                   help="KV blocks of headroom kept per running request more urgent than priority 0")
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="start and drain instances to keep the average freeness in a band (as serve's)")
    g.add_argument("--instance-start-s", type=float, default=20.0,
                   help="with --autoscale: seconds from the decision to start an instance until it serves (an "
                        "assumption: set what your deployment measures)")
    c = p.add_argument_group("capacity search (as `tokenyard bench capacity`, in simulation)")
    c.add_argument("--capacity", action="store_true",
                   help="binary-search the largest Poisson rate whose P99 TBT (and median TTFT) meet --slo "
                        "tbt:MS [ttft:MS]; synthetic lengths (--input-len, --output-len), --num-prompts per probe")
    c.add_argument("--min-rate", type=float, default=0.1, help="requests per second")
    c.add_argument("--max-rate", type=float, default=64.0, help="requests per second")
    c.add_argument("--probes", type=int, default=8, help="simulated runs in all, the two ends included")
    s = p.add_argument_group("simulation")
    s.add_argument("--collapse", action=argparse.BooleanOptionalAction, default=True,
                   help="run repeated decode steps as one event (exact; off: every step through the scheduler)")
    s.add_argument("--token-times", action=argparse.BooleanOptionalAction, default=True,
                   help="keep every token's time (inter-token latency); off: first and last only (faster)")
    s.add_argument("--check-invariants", action="store_true",
                   help="check the scheduler's invariants after every step (slow)")
    p.set_defaults(func=simulate)


def build(args: argparse.Namespace):
    """The scheduler config, cost model and simulator config the flags ask for (ValueError on a bad one)."""
    from tokenyard.config import parse_tenant_weights
    from tokenyard.sched.scheduler import SchedulerConfig
    from tokenyard.sim.cost import default_vidur_profiles, load_cost_model
    from tokenyard.sim.simulator import SimConfig

    spec = args.cost_model
    profiles = args.vidur_profiles
    if spec == DEFAULT_COST_MODEL and profiles is None and not (default_vidur_profiles() / "compute").is_dir():
        spec = "roofline:h100:llama-2-7b"
        say(f"no Vidur profiles at {default_vidur_profiles()}: using the {spec} cost model")
    if not args.step_overhead_ms >= 0:
        raise ValueError(f"--step-overhead-ms: must be >= 0, got {args.step_overhead_ms}")
    cost = load_cost_model(spec, profiles_dir=profiles, block_size=args.block_size,
                           num_kv_blocks=args.num_kv_blocks, overhead_s=args.step_overhead_ms / 1e3)
    weights = parse_tenant_weights(args.vtc_tenant_weights) if args.vtc_tenant_weights else {}
    sched = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                            scheduling_policy=args.scheduling_policy, preemption_mode=args.preemption_mode,
                            swap_overlap=args.swap_overlap, vtc_w_p=args.vtc_w_p, vtc_w_q=args.vtc_w_q,
                            tenant_weights=weights)
    max_len = args.max_model_len or getattr(cost, "data", {}).get("max_model_len") or 4096
    if max_len < 2:
        raise ValueError(f"--max-model-len: must be at least 2, got {max_len}")
    autoscale = None
    if args.autoscale is not None:
        lo, _, hi = args.autoscale.partition(":")
        try:
            autoscale = (int(lo), int(hi or lo))
        except ValueError:
            raise ValueError(f"--autoscale: expected MIN:MAX instances, got {args.autoscale!r}") from None
    cfg = SimConfig(num_instances=args.instances, dispatch=args.dispatch, migration=args.migration,
                    autoscale=autoscale, instance_start_s=args.instance_start_s,
                    interval_s=args.interval_s, priority_headroom=args.priority_headroom,
                    num_kv_blocks=args.num_kv_blocks, num_host_blocks=args.num_host_blocks,
                    enable_prefix_caching=args.enable_prefix_caching, block_groups=args.swap_block_groups,
                    max_model_len=max_len, collapse=args.collapse, record_tokens=args.token_times,
                    check_invariants=args.check_invariants)
    return sched, cost, cfg


def simulate(args: argparse.Namespace) -> int:
    from tokenyard.bench import metrics
    from tokenyard.bench.client import BenchError
    from tokenyard.bench.report import print_summary
    from tokenyard.bench.runner import analyse, build_workload, report_of, write_outputs
    from tokenyard.bench.workload import parse_floats
    from tokenyard.sim.simulator import Simulator

    try:
        sched, cost, cfg = build(args)
        if args.capacity:
            return capacity(args, sched, cost, cfg)
        workload = build_workload(args)
    except BenchError as e:
        say(str(e))
        return 1
    slo = metrics.parse_slo(args.slo or [])
    sim = Simulator(sched, cost, cfg)
    say(f"{len(workload.specs)} requests, {cfg.num_instances} instance(s) of {sim.num_blocks} KV blocks, "
        f"cost model {cost.name}")
    t0 = time.perf_counter()
    res = sim.run(workload.specs)
    wall = time.perf_counter() - t0
    recs = res.records
    a = analyse(args, recs, workload.tenants, slo,
                parse_floats(args.tenant_service_weights, "--tenant-service-weights", args.tenants))
    title = (f"tokenyard simulate{f' [{args.label}]' if args.label else ''}: {cfg.num_instances} x {cost.name}, "
             f"{args.scheduling_policy}, dispatch {cfg.dispatch}{' + migration' if cfg.migration else ''}")
    if recs:
        print_summary(a.summary, title, a.by_tenant, a.fairness, a.by_priority)
    simulation = {
        "instances": cfg.num_instances, "cost_model": cost.describe(), "num_kv_blocks": sim.num_blocks,
        "max_model_len": cfg.max_model_len,
        "wall_s": wall, "requests_per_wall_s": len(recs) / wall if wall > 0 else None,
        "simulated_s": res.duration_s, "steps": res.steps, "span_steps": res.span_steps,
        "migrations": res.migrations, "migrations_aborted": res.migrations_aborted, "per_instance": res.instances,
        "instance_seconds": res.instance_seconds, "scale_events": res.scale_events,
    }
    print(f"simulated {len(recs)} requests ({res.duration_s:.1f} s of serving, {res.steps} steps, "
          f"{res.span_steps} in collapsed spans, {res.migrations} migrations) in {wall:.2f} s of wall time: "
          f"{simulation['requests_per_wall_s']:.0f} requests/s")
    if res.scale_events:
        starts = sum(e[1] == "start" for e in res.scale_events)
        stops = sum(e[1] == "stop" for e in res.scale_events)
        print(f"auto-scaling: {starts} instances started, {stops} drained and stopped; "
              f"{res.instance_seconds:.0f} instance-seconds")
    report = report_of(args, a, recs, {"simulated": True, "workload": {"num_requests": len(recs), "tenants":
                                                                       workload.tenants, **workload.notes}},
                       {"simulation": simulation})
    write_outputs(args, report, recs, title, a.timeline, say)
    return 0 if a.summary["completed"] > 0 else 1


def capacity(args: argparse.Namespace, sched, cost, cfg) -> int:
    """``--capacity``: bench capacity's search (the same probe plan and pass rule), each probe a simulation."""
    from tokenyard.bench import metrics
    from tokenyard.bench.capacity import Probe, Search, judge, plan
    from tokenyard.bench.report import write_json
    from tokenyard.bench.runner import lengths_from_args
    from tokenyard.bench.workload import synthetic
    from tokenyard.sim.simulator import Simulator

    if args.trace:
        raise ValueError("--capacity probes synthetic Poisson loads: give --input-len/--output-len, not --trace")
    slo = metrics.parse_slo(args.slo or [], allowed=("tbt", "ttft"))
    if "tbt" not in slo:
        raise ValueError("--capacity needs --slo tbt:MS (and optionally ttft:MS)")
    if not 0 < args.min_rate < args.max_rate:
        raise ValueError(f"--min-rate {args.min_rate} must be positive and below --max-rate {args.max_rate}")
    if args.probes < 2:
        raise ValueError(f"--probes: need at least 2 (the two ends), got {args.probes}")
    n = args.num_prompts or 100
    in_dist, out_dist = lengths_from_args(args)
    search = Search(args.min_rate, args.max_rate)
    while len(search.probes) < args.probes:
        rate = plan(search.passes, args.min_rate, args.max_rate)
        if rate is None:
            break
        specs = synthetic(n, in_dist, out_dist, rate, args.burstiness, args.multi_turn, args.seed)
        summary = metrics.summary(Simulator(sched, cost, cfg).run(specs).records)
        reasons = judge(summary, slo, len(specs))
        search.probes.append(Probe(rate, not reasons, reasons, summary))
        tbt = summary["itl_ms"]["p99"]
        print(f"probe {len(search.probes)}/{args.probes}: {rate:.4g} req/s: P99 TBT "
              f"{'-' if tbt is None else f'{tbt:.1f}'} ms, median TTFT {summary['ttft_ms']['median'] or 0:.1f} ms: "
              f"{'pass' if not reasons else 'fail (' + '; '.join(reasons) + ')'}")
    result = search.result()
    if result["capacity"] is None:
        print(f"capacity: below --min-rate {args.min_rate:g} req/s")
    elif result["bound"] == "at_least":
        print(f"capacity: at least {result['capacity']:.4g} req/s (--max-rate still meets the SLO)")
    else:
        print(f"capacity: {result['bracket'][0]:.4g} req/s ({result['bracket'][1]:.4g} req/s does not meet the SLO)")
    if args.result_json:
        report = {"label": args.label, "simulated": True,
                  "config": {k: v for k, v in vars(args).items() if k != "func"}, "slo_ms": slo,
                  "cost_model": cost.describe(), **result, "probes": [p.to_json() for p in search.probes]}
        say(f"wrote {write_json(args.result_json, report)}")
    return 0
