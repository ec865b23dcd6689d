"""Run one serving workload against tokenyard and its peers, one server at a time, and compare them.

Peers, all on the same model (the bundled SmolLM2-135M-Instruct; tokenyard and the HF baseline serve the
fp32 weights converted from the GGUF file the llama.cpp peers load directly):

    tokenyard          python -m tokenyard.cli serve (continuous batching, chunked prefill, paged KV)
    llama-server       llama.cpp's server (start_llama_server.sh; continuous batching over --slots slots)
    hf                 hf_server.py: transformers forward passes with static batching
    llama-cpp-python   python -m llama_cpp.server (start_llama_cpp_python.sh; one request at a time);
                       only with --with-llama-cpp-python (its first run compiles llama.cpp for minutes)

For each peer in turn: prepare it (build or install on first use), start it, wait until it answers, send
one warm-up completion, run `tokenyard bench serve` with the same workload (prompts, lengths, arrival
times from the same seed), stop it, and keep its result JSON. A peer that fails to prepare, start or
finish the benchmark is reported and skipped. Never two servers at once: they would share the cores.

    python benchmarks/peers/compare.py                      # the default workload against the 3 peers
    python benchmarks/peers/compare.py --peers tokenyard,hf --num-prompts 16
    python benchmarks/peers/compare.py --tokenyard-args "--max-num-batched-tokens 256"
    python benchmarks/peers/compare.py --smoke              # start/answer/stop each server, no benchmark

Writes benchmarks/results/peers.json (workload, machine, each peer's command, summary or error, and the
tokenyard/peer ratios) and each peer's own result and server log under benchmarks/results/peers/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import httpx
    from rich.console import Console
    from rich.table import Table
except ImportError as e:  # pragma: no cover - a hint for a bare environment
    raise SystemExit(f"compare.py needs httpx and rich ({e}); run: pip install -e '.[test]'") from e

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ALL_PEERS = ("tokenyard", "llama-server", "hf", "llama-cpp-python")
console = Console(width=max(shutil.get_terminal_size((160, 40)).columns, 160))  # the table needs ~150


@dataclass
class Peer:
    name: str
    command: list[str]
    health_path: str
    prepare: list[str] | None = None        # run once before starting (build / install); its time is not timed
    prepare_timeout_s: float = 1800.0
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_peers(args: argparse.Namespace, names: list[str]) -> list[Peer]:
    py = sys.executable
    peers = []
    for name in names:
        port = free_port()
        if name == "tokenyard":
            cmd = [py, "-m", "tokenyard.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--num-threads", str(args.threads), "--no-access-log", *shlex.split(args.tokenyard_args)]
            peers.append(Peer(name, cmd, "/health"))
        elif name == "llama-server":
            cmd = ["bash", str(HERE / "start_llama_server.sh"), "--foreground", "--port", str(port),
                   "--slots", str(args.llama_server_slots), "--threads", str(args.threads),
                   "--", *shlex.split(args.llama_server_args)]
            peers.append(Peer(name, cmd, "/health", prepare=["bash", str(HERE / "build_llama_cpp.sh")]))
        elif name == "hf":
            cmd = [py, str(HERE / "hf_server.py"), "--port", str(port), "--threads", str(args.threads),
                   "--max-batch", str(args.hf_max_batch), "--batch-wait-ms", str(args.hf_batch_wait_ms),
                   *shlex.split(args.hf_args)]
            peers.append(Peer(name, cmd, "/health"))
        elif name == "llama-cpp-python":
            script = str(HERE / "start_llama_cpp_python.sh")
            cmd = ["bash", script, "--foreground", "--port", str(port), "--threads", str(args.threads),
                   "--", *shlex.split(args.llama_cpp_python_args)]
            peers.append(Peer(name, cmd, "/v1/models", prepare=["bash", script, "--install-only"]))
    if sys.prefix != sys.base_prefix:  # the start scripts find the bundled model with this venv's python
        for p in peers:
            p.env["VENV"] = sys.prefix
    return peers


def port_of(peer: Peer) -> int:
    return int(peer.command[peer.command.index("--port") + 1])


class Server:
    """One peer's server process (its own process group) and its log file."""

    def __init__(self, peer: Peer, log_path: Path):
        self.peer = peer
        self.url = f"http://127.0.0.1:{port_of(peer)}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> float:
        env = {**os.environ, **self.peer.env}
        with open(self.log_path, "ab") as log:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.peer.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=env, start_new_session=True)
        deadline = t0 + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"exited with status {self.proc.returncode} before answering; "
                                       f"last log lines:\n{tail(self.log_path)}")
                try:
                    if client.get(self.url + self.peer.health_path).status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"did not answer {self.peer.health_path} within {timeout_s:g} s; "
                                       f"last log lines:\n{tail(self.log_path)}")
                time.sleep(0.5)

    def stop(self, grace_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            return self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()
        except ProcessLookupError:
            return self.proc.wait()
        finally:
            try:  # children that outlived the leader (a wrapper script's server)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def model_name(url: str) -> str:
    r = httpx.get(url + "/v1/models", timeout=10.0)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def probe(url: str, model: str, max_tokens: int = 16) -> dict:
    """One streamed completion with ignore_eos and include_usage: what the server returned and how fast."""
    body = {"model": model, "prompt": "The three most useful things to know about trains are",
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    text, chunks, usage, finish, ttft = [], 0, None, None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300.0) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error in stream: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj.get("choices") or []:
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(c.get("text") or "")
                finish = c.get("finish_reason") or finish
    return {"text": "".join(text), "content_chunks": chunks, "usage": usage, "finish_reason": finish,
            "ttft_s": ttft, "e2e_s": time.perf_counter() - t0}


def bench_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "tokenyard.cli", "bench", "serve", "--help"], cwd=REPO,
                       capture_output=True, text=True)
    return r.returncode == 0


def run_bench(args: argparse.Namespace, url: str, model: str, label: str, out: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "tokenyard.cli", "bench", "serve", "--base-url", url, "--model", model,
           "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
           "--input-len", args.input_len, "--output-len", str(args.output_len), "--seed", str(args.seed),
           "--result-json", str(out), "--label", label, *(["--ignore-eos"] if args.ignore_eos else []),
           *shlex.split(args.bench_args)]
    console.print(f"[dim]$ {shlex.join(cmd)}[/dim]")
    with open(log, "ab") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=args.bench_timeout)
    if r.returncode != 0:
        raise RuntimeError(f"tokenyard bench serve exited with status {r.returncode}; last lines:\n{tail(log)}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ report
# (column title, summary key, statistic or None, higher is better)
METRICS = [
    ("out tok/s", "output_throughput", None, True),
    ("req/s", "request_throughput", None, True),
    ("TTFT mean", "ttft_ms", "mean", False),
    ("TTFT med", "ttft_ms", "median", False),
    ("TTFT P99", "ttft_ms", "p99", False),
    ("TPOT med", "tpot_ms", "median", False),
    ("TPOT P99", "tpot_ms", "p99", False),
    ("ITL P99", "itl_ms", "p99", False),
    ("E2E med", "e2e_ms", "median", False),
]


def metric(summary: dict, key: str, stat: str | None) -> float | None:
    v = summary.get(key)
    if stat is not None:
        v = v.get(stat) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) else None


def ratios(results: dict) -> dict:
    base = results.get("tokenyard", {}).get("summary")
    if not base:
        return {}
    out = {}
    for name, r in results.items():
        if name == "tokenyard" or not r.get("summary"):
            continue
        row = {}
        for _, key, stat, _ in METRICS:
            a, b = metric(base, key, stat), metric(r["summary"], key, stat)
            row[f"{key}.{stat}" if stat else key] = a / b if a is not None and b else None
        out[name] = row
    return out


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_report(results: dict, rat: dict) -> None:
    t = Table(title="serving comparison (latencies in ms)")
    t.add_column("peer")
    for title, *_ in METRICS:
        t.add_column(title, justify="right")
    t.add_column("done/failed", justify="right")
    for name, r in results.items():
        s = r.get("summary")
        if not s:
            t.add_row(name, *["-"] * len(METRICS), f"[red]{r.get('status')}[/red]")
            continue
        cells = [fmt(metric(s, key, stat), 2 if key == "request_throughput" else 1) for _, key, stat, _ in METRICS]
        t.add_row(name, *cells, f"{s.get('completed', '?')}/{s.get('failed', '?')}")
    console.print(t)
    if rat:
        t = Table(title="tokenyard / peer (throughput: >1 means tokenyard is better; latency: <1 means it is)")
        t.add_column("peer")
        for title, *_ in METRICS:
            t.add_column(title, justify="right")
        for name, row in rat.items():
            cells = []
            for _, key, stat, higher in METRICS:
                v = row[f"{key}.{stat}" if stat else key]
                good = v is not None and (v > 1 if higher else v < 1)
                cells.append("-" if v is None else f"[{'green' if good else 'red'}]{v:.2f}x[/]")
            t.add_row(name, *cells)
        console.print(t)


def print_problems(results: dict) -> None:
    for name, r in results.items():
        if r.get("error"):
            console.print(f"[red]{name}: {r['status']}[/red]: {r['error']}")
        elif (r.get("summary") or {}).get("failures"):
            console.print(f"[yellow]{name}: failures[/yellow] {r['summary']['failures']}")


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent busy over a short window (Linux), before a server starts."""
    def sample():
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1), 3)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--peers", default="tokenyard,llama-server,hf",
                   help=f"comma-separated, in run order, from {', '.join(ALL_PEERS)}")
    p.add_argument("--with-llama-cpp-python", action="store_true", help="add llama-cpp-python to --peers")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=2.0, help="Poisson arrivals per second")
    p.add_argument("--input-len", default="64:512", help="prompt tokens, N or LO:HI")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-args", default="",
                   help="more flags for tokenyard bench serve; the *-args options take one quoted string,\n"
                        "written with '=' when it starts with a dash: --bench-args='--max-concurrency 8'")
    p.add_argument("--bench-timeout", type=float, default=3600.0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every server")
    p.add_argument("--tokenyard-args", default="", help="flags for tokenyard serve, e.g. '--max-num-seqs 32'")
    p.add_argument("--llama-server-slots", type=int, default=16, help="llama-server -np")
    p.add_argument("--llama-server-args", default="", help="more flags for llama-server")
    p.add_argument("--hf-max-batch", type=int, default=16)
    p.add_argument("--hf-batch-wait-ms", type=float, default=100.0)
    p.add_argument("--hf-args", default="", help="more flags for hf_server.py")
    p.add_argument("--llama-cpp-python-args", default="", help="more flags for llama_cpp.server")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a started server gets to answer")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up completion")
    p.add_argument("--smoke", action="store_true",
                   help="only start each server, send one streamed completion, stop it (no benchmark)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "peers.json")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    if args.with_llama_cpp_python and "llama-cpp-python" not in names:
        names.append("llama-cpp-python")
    bad = [n for n in names if n not in ALL_PEERS]
    if bad or not names:
        p.error(f"unknown peer(s) {bad}; choose from {', '.join(ALL_PEERS)}")
    args.peer_names = list(dict.fromkeys(names))
    return args


def run_peer(args: argparse.Namespace, peer: Peer, outdir: Path) -> dict:
    log = outdir / f"{peer.name}.log"
    log.write_text("")
    rec: dict = {"status": "ok", "command": peer.command}
    if peer.prepare:
        console.print(f"[bold]{peer.name}[/bold]: preparing ([dim]{shlex.join(peer.prepare)}[/dim])")
        t0 = time.monotonic()
        try:
            with open(log, "ab") as f:
                r = subprocess.run(peer.prepare, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                   env={**os.environ, **peer.env}, timeout=peer.prepare_timeout_s)
        except subprocess.TimeoutExpired:
            return {**rec, "status": "prepare failed", "error": f"timed out after {peer.prepare_timeout_s:g} s"}
        if r.returncode != 0:
            return {**rec, "status": "prepare failed", "error": f"exit status {r.returncode}:\n{tail(log)}"}
        rec["prepare_s"] = round(time.monotonic() - t0, 1)
    rec["background_cpu_busy"] = busy = cpu_busy()
    if busy is not None and busy > 0.25:
        console.print(f"[yellow]{peer.name}: the CPUs are {busy:.0%} busy before it starts: something else is "
                      "running, and its numbers will suffer (llama.cpp's spinning threads the most)[/yellow]")
    server = Server(peer, log)
    console.print(f"[bold]{peer.name}[/bold]: starting on {server.url}")
    try:
        try:
            rec["startup_s"] = round(server.start(args.startup_timeout), 1)
            rec["url"] = server.url
            rec["model"] = model_name(server.url)
        except Exception as e:  # noqa: BLE001 - any failure to come up is reported, and the next peer runs
            return {**rec, "status": "start failed", "error": str(e)}
        console.print(f"[bold]{peer.name}[/bold]: ready in {rec['startup_s']} s, model {rec['model']!r}")
        if args.warmup or args.smoke:
            try:
                rec["probe"] = probe(server.url, rec["model"])
            except Exception as e:  # noqa: BLE001
                return {**rec, "status": "probe failed", "error": f"{type(e).__name__}: {e}"}
            pr = rec["probe"]
            console.print(f"[bold]{peer.name}[/bold]: probe {pr['content_chunks']} chunks, usage {pr['usage']}, "
                          f"finish {pr['finish_reason']!r}, ttft {pr['ttft_s']:.3f} s, e2e {pr['e2e_s']:.3f} s: "
                          f"{pr['text'][:60]!r}")
        if args.smoke:
            return rec
        result_path = outdir / f"{peer.name}.json"
        try:
            result = run_bench(args, server.url, rec["model"], peer.name, result_path, log)
        except Exception as e:  # noqa: BLE001
            return {**rec, "status": "bench failed", "error": str(e)}
        rec["result_json"] = str(result_path)
        rec["summary"] = result.get("summary")
        if not rec["summary"]:
            return {**rec, "status": "bench failed", "error": "the result JSON has no summary"}
        return rec
    finally:
        code = server.stop()
        rec["exit_status"] = code
        console.print(f"[bold]{peer.name}[/bold]: stopped (status {code})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outdir = args.out.parent / "peers"
    outdir.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not bench_available():
        console.print("[red]`tokenyard bench serve` is not available in this checkout; "
                      "run with --smoke to test the servers only[/red]")
        return 2
    peers = build_peers(args, args.peer_names)
    results: dict[str, dict] = {}
    try:
        for peer in peers:
            results[peer.name] = run_peer(args, peer, outdir)
            if results[peer.name].get("error"):
                console.print(f"[red]{peer.name}: {results[peer.name]['status']}[/red] "
                              f"(log: {outdir / (peer.name + '.log')})")
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; reporting what finished[/yellow]")
    rat = ratios(results)
    report = {
        "workload": {k: getattr(args, k) for k in ("num_prompts", "request_rate", "input_len", "output_len",
                                                   "ignore_eos", "seed", "threads", "bench_args")},
        "machine": machine(),
        "smoke": args.smoke,
        "peers": results,
        "ratios_tokenyard_over_peer": rat,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not args.smoke:
        print_report(results, rat)
    print_problems(results)
    out = args.out if not args.smoke else args.out.with_name(args.out.stem + "-smoke.json")
    out.write_text(json.dumps(report, indent=2, default=str))
    console.print(f"wrote {out}")
    return 0 if all(r.get("status") == "ok" for r in results.values()) and results else 1


if __name__ == "__main__":
    raise SystemExit(main())
