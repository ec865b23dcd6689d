"""``tokenyard serve | generate | chat | bench``. Engine flags are generated from EngineConfig's fields, one to one."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
import types
import typing
from pathlib import Path

from tokenyard.config import EngineConfig

_T0 = time.perf_counter()


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help already says what "not given" means (a None default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# --------------------------------------------------------------------------- engine flags
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field: ``max_num_seqs`` -> ``--max-num-seqs``; bools get ``--no-...`` too."""
    group = parser.add_argument_group("engine (EngineConfig fields)")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) else ()
        base = next((a for a in args if a is not type(None)), tp)
        help_text = f.metadata.get("help") or f"EngineConfig.{f.name}"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=base, default=f.default, help=help_text,
                               choices=f.metadata.get("choices"))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


# --------------------------------------------------------------------------- serve
def _seconds_since_process_start() -> float:
    """Age of this process, from /proc where there is one (so interpreter and torch imports count too)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenyard.server.app import ServerSettings, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"model: given twice ({args.model_path!r} and --model {args.model!r})")
        args.model = args.model_path
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty")
    failed: list[BaseException] = []

    def engine_failed(e: BaseException) -> None:  # from the engine's loop thread
        failed.append(e)
        server.should_exit = True

    async_engine, load_time_s = _make_engine(args, engine_failed)
    if args.served_model_name:
        async_engine.model_name = args.served_model_name
    settings = ServerSettings(api_key=args.api_key or os.environ.get("TOKENYARD_API_KEY"),
                              max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                              metrics_max_tenants=args.metrics_max_tenants, public_metrics=args.public_metrics,
                              share_prefix_cache_across_tenants=args.share_prefix_cache_across_tenants,
                              client_priority_range=args.client_priority_range)
    app = create_app(async_engine, settings)

    class Server(uvicorn.Server):
        draining = False

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                print(f"tokenyard: serving {async_engine.model_name} on http://{args.host}:{args.port} "
                      f"(ready in {_seconds_since_process_start():.1f} s; model load {load_time_s:.1f} s)",
                      flush=True)

        def handle_exit(self, sig: int, frame) -> None:
            """SIGTERM/SIGINT: drain first (the listener stays open: new requests and /health get 503 JSON),
            then stop. A second signal stops at once, as plain uvicorn does."""
            if self.draining:   # a second signal: stop now
                self._captured_signals.append(sig)
                self.should_exit = self.force_exit = True
                return
            if not self.started or self.should_exit:
                super().handle_exit(sig, frame)
                return
            self.draining = True
            self._captured_signals.append(sig)
            asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

        async def drain(self) -> None:
            try:
                await self._drain()
            finally:   # whatever happens, the server stops
                self.should_exit = True

        async def _drain(self) -> None:
            async_engine.stop_accepting()
            deadline = time.monotonic() + args.shutdown_timeout
            if async_engine.num_inflight:
                logging.getLogger("tokenyard").info(
                    "shutting down: %d requests in flight get up to %.0f s to finish (signal again to stop now)",
                    async_engine.num_inflight, args.shutdown_timeout)
            while async_engine.num_inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if async_engine.num_inflight:
                logging.getLogger("tokenyard").warning(
                    "shutting down: aborting the %d requests still in flight", async_engine.num_inflight)
                async_engine.abort_all()   # each client gets a 503 JSON, or an SSE error event and [DONE]
                grace = time.monotonic() + 5.0
                while async_engine.num_inflight and time.monotonic() < grace:
                    await asyncio.sleep(0.05)

    # tokenyard drains on SIGINT/SIGTERM (Server.drain above); then uvicorn closes the connections (a few
    # seconds at most: the responses are complete by then) and runs the app's lifespan exit, which stops the
    # engine. Afterwards uvicorn re-raises the signal to the handler that was there before: for SIGTERM, make
    # that a clean exit (status 0), since the shutdown it asked for has completed.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=args.access_log)
    # A forced stop (a second signal) skips the app's lifespan exit, which stops the engine: stop it on the way
    # out as well, before the interpreter shuts down around a running engine thread (see AsyncEngine.stop_now).
    def exit_after_sigterm(*_: object) -> None:
        async_engine.stop_now()
        if failed:   # the engine died during the drain: still a failure
            print(f"tokenyard: the engine loop failed ({failed[0]!r}); exiting", file=sys.stderr, flush=True)
        raise SystemExit(1 if failed else 0)

    signal.signal(signal.SIGTERM, exit_after_sigterm)
    server = Server(config)
    server.run()
    async_engine.stop_now()
    if failed:  # the engine loop died: exit non-zero rather than answer 503 forever
        print(f"tokenyard: the engine loop failed ({failed[0]!r}); exiting", file=sys.stderr, flush=True)
        return 1
    return 0


def _make_engine(args: argparse.Namespace, on_failure):
    """The engine the server runs on: one in this process, or a cluster of Ray actors (``--instances N`` or
    ``--ray-address``). Returns it and the model load time."""
    config = engine_config(args)
    if args.instances == 1 and args.ray_address is None:
        from tokenyard.engine.async_engine import AsyncEngine
        from tokenyard.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
        return AsyncEngine(engine, max_waiting=args.max_waiting, on_failure=on_failure), engine.load_time_s
    from tokenyard.cluster.rebalance import AutoScaler
    from tokenyard.cluster.runtime.frontend import ClusterConfig, ClusterEngine

    autoscale = None
    if args.autoscale is not None:
        lo, _, hi = args.autoscale.partition(":")
        try:
            autoscale = AutoScaler(min_instances=int(lo), max_instances=int(hi or lo))
        except ValueError as e:
            raise ValueError(f"--autoscale: expected MIN:MAX instances, got {args.autoscale!r} ({e})") from None
    cluster = ClusterConfig(num_instances=args.instances, dispatch=args.dispatch, migration=args.migration,
                            priority_headroom=args.priority_headroom, autoscale=autoscale,
                            ray_address=args.ray_address, instance_threads=args.instance_threads)
    where = f"the Ray cluster at {args.ray_address}" if args.ray_address else "a local Ray"
    print(f"tokenyard: starting {args.instances} instances on {where} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    engine = ClusterEngine(config, cluster, max_waiting=args.max_waiting, on_failure=on_failure)
    engine.start()
    return engine, time.perf_counter() - t0


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    from tokenyard.cluster.dispatch import DISPATCH_POLICIES

    g = parser.add_argument_group("cluster (many instances behind this endpoint, on Ray)")
    g.add_argument("--instances", type=int, default=1,
                   help="engine instances, each a Ray actor in its own process (1: no Ray, one engine here)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto': the one `ray start` runs here) instead of starting one")
    g.add_argument("--dispatch", default="freeness", choices=sorted(DISPATCH_POLICIES),
                   help="where a new request goes")
    g.add_argument("--migration", action=argparse.BooleanOptionalAction, default=True,
                   help="live-migrate running requests from the least free instances to the freest (Llumnix)")
    g.add_argument("--instance-threads", type=int, default=None,
                   help="torch threads per instance (default: this machine's cores split between instances)")
    g.add_argument("--priority-headroom", type=int, default=0,
                   help="KV blocks of headroom kept per running request more urgent than priority 0")
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="start and drain instances to keep the average freeness in a band, between MIN and MAX")


# --------------------------------------------------------------------------- one-off answers
def _one_off(args: argparse.Namespace) -> int:
    from tokenyard.engine.llm_engine import LLMEngine
    from tokenyard.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    print(f"tokenyard: loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", file=sys.stderr,
          flush=True)
    engine = LLMEngine(engine_config(args))
    if args.command == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt: str | list[int] = engine.tokenizer.apply_chat_template(
            messages + [{"role": "user", "content": args.text}])
    else:
        prompt = args.text
    engine.add_request(prompt, params)
    while engine.has_unfinished_requests():  # print the answer as it is generated
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenyard", description="An LLM serving system.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           formatter_class=_Help)
    serve.add_argument("model_path", nargs="?", metavar="MODEL",
                       help="the model to serve, as `--model` (vLLM's form: tokenyard serve MODEL)")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients ask for and /v1/models lists (default: the model's own)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1/* (or set $TOKENYARD_API_KEY)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests waiting for their first token before new ones get 503")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    serve.add_argument("--public-metrics", action="store_true",
                       help="serve /metrics and the OpenAPI pages without the key even when --api-key is set")
    serve.add_argument("--share-prefix-cache-across-tenants", action="store_true",
                       help="let tenants (`user`) share prefix-cache blocks; by default each named tenant's "
                            "prompts are salted by its name, so cached_tokens reveals nothing across tenants")
    serve.add_argument("--client-priority-range", default="0:1000",
                       help="priorities clients may ask for, LO:HI (lower is more urgent), or 'any' to trust them")
    serve.add_argument("--metrics-max-tenants", type=int, default=20,
                       help="tenants with their own label in /metrics; the others are summed as 'other'")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    add_engine_args(serve)
    add_cluster_args(serve)
    serve.set_defaults(func=_serve)

    for name, what in (("generate", "complete a prompt"), ("chat", "answer one chat message")):
        p = sub.add_parser(name, help=f"{what} and print the answer",
                           formatter_class=_Help)
        p.add_argument("text", help="the prompt" if name == "generate" else "the user message")
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--seed", type=int, default=None)
        if name == "chat":
            p.add_argument("--system", default=None, help="an optional system message")
        add_engine_args(p)
        p.set_defaults(func=_one_off)

    prof = sub.add_parser("profile", formatter_class=_Help,
                          help="time the real engine's steps and KV copies on this machine and write a cost model "
                               "for `tokenyard simulate --cost-model FILE`")
    prof.add_argument("--output", "-o", default="tokenyard-profile.json", help="the profile file to write")
    prof.add_argument("--repeats", type=int, default=5, help="timed steps per probe shape (their median is fitted)")
    prof.add_argument("--from-step-log", nargs="+", default=None, metavar="FILE",
                      help="fit to steps logged while serving (`tokenyard serve --step-log FILE`) instead of "
                           "running probes: the model then includes what serving costs beside the forward pass")
    prof.add_argument("--copies-from", default=None, metavar="PROFILE",
                      help="with --from-step-log: take the KV copy speeds from this probe profile")
    add_engine_args(prof)
    prof.set_defaults(func=_profile)

    from tokenyard.bench.cli_args import add_bench_parser

    add_bench_parser(sub)
    from tokenyard.sim.cli import add_simulate_parser

    add_simulate_parser(sub)
    return parser


def _profile(args: argparse.Namespace) -> int:
    if args.copies_from and not args.from_step_log:
        raise ValueError("--copies-from goes with --from-step-log (a probe run times the copies itself)")
    if args.from_step_log:
        import json

        from tokenyard.sim.steplog import profile_from_step_log, summary_line

        base = json.loads(Path(args.copies_from).read_text()) if args.copies_from else None
        data = profile_from_step_log(args.from_step_log, base)
        Path(args.output).write_text(json.dumps(data, indent=1))
        print(f"tokenyard profile: fit: {summary_line(data)}; wrote {args.output}", file=sys.stderr)
        return 0
    from tokenyard.engine.profiler import profile

    if args.repeats < 1:
        raise ValueError(f"--repeats: must be at least 1, got {args.repeats}")
    profile(engine_config(args), args.output, repeats=args.repeats)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad flags, model paths and parameters: say what, without a traceback
        parser.exit(2, f"tokenyard: error: {e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
