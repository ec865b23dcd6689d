"""Start-up time of ``tokenyard serve``: process start to the first answered chat completion.

    python benchmarks/bench_startup.py --runs 3            # the bundled model, cache already converted

Each run starts a fresh server process on a free port, polls ``POST /v1/chat/completions`` (max_tokens=1)
until it answers 200, records the elapsed time, then stops the server. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(extra: list[str], timeout: float) -> float:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tokenyard.cli", "serve", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        with httpx.Client(timeout=5.0) as c:
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {proc.returncode}")
                try:
                    models = c.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
                    body["model"] = models[0]["id"]
                    if c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).status_code == 200:
                        return time.perf_counter() - t0
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"no answer within {timeout} s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--result-json", default="benchmarks/results/startup.json")
    ap.add_argument("serve_args", nargs="*", help="extra flags for tokenyard serve (after --)")
    args = ap.parse_args()
    times = [one_run(args.serve_args, args.timeout) for _ in range(args.runs)]
    for i, t in enumerate(times):
        print(f"run {i + 1}: {t:.2f} s to the first answered request")
    print(f"median {statistics.median(times):.2f} s, min {min(times):.2f} s, max {max(times):.2f} s")
    out = Path(args.result_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs_s": times, "median_s": statistics.median(times)}, indent=2))


if __name__ == "__main__":
    main()
