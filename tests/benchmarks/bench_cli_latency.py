"""Wall-clock time of the commands that talk to a running node: `status`, `offers search`,
`rentals` (issue 17: goal p50 < 0.3 s), each a fresh `gpumarket` process as a person runs it.

Run from the repository root: PYTHONPATH=. python tests/benchmarks/bench_cli_latency.py [--n 15]
Starts one provider node (embedded chain, one simulated GPU, so that its book holds its own
offer), runs each command --n times one after another, and prints a human summary, then one
JSON line (the last line) with seconds per command (bytecode caches on, as after pip install) (p50, p95, max; and node_answer_p50_s, the
same request sent from inside this process: the node's share) and the machine's load
average at the start (the figures are wall-clock: a loaded machine shows in them).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from node.devnet import start_node_process

EXE = shutil.which("gpumarket") or os.path.join(os.path.dirname(sys.executable), "gpumarket")
# As installed: pip writes bytecode caches, so the commands run without PYTHONDONTWRITEBYTECODE
# (set on some development machines; it makes every run compile node/cli.py again, ~50 ms).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["GPUMARKET_PASSWORD"] = "bench"
COMMANDS = {"status": ["status", "--json"], "offers search": ["offers", "search", "--json"],
            "rentals": ["rentals", "--json"]}


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    d = root / "node"
    subprocess.run([EXE, "--data-dir", str(d), "init", "--provider"], check=True, env=ENV,
                   capture_output=True, stdin=subprocess.DEVNULL)
    cfg = d / "config.toml"
    cfg.write_text(cfg.read_text().replace('listen = ["/ip4/0.0.0.0/tcp/4001"]',
                                           'listen = ["/ip4/127.0.0.1/tcp/0"]') + "fake_gpus = 1\n")
    proc, _ = start_node_process(EXE, d, ENV)
    load = os.getloadavg()[0]
    result = {"n": args.n, "cpus": os.cpu_count(), "loadavg_1m": round(load, 2),
              "python": platform.python_version(), "commands": {}}
    try:
        for name, argv in COMMANDS.items():
            times = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                out = subprocess.run([EXE, "--data-dir", str(d), *argv], capture_output=True,
                                     text=True, env=ENV, stdin=subprocess.DEVNULL)
                times.append(time.perf_counter() - t0)
                if out.returncode != 0:
                    raise SystemExit(f"{name} failed: {out.stderr}")
                json.loads(out.stdout)  # what was timed is a real answer
            result["commands"][name] = {"p50_s": round(pct(times, 50), 3),
                                        "p95_s": round(pct(times, 95), 3),
                                        "max_s": round(max(times), 3)}
            # the same request from this process: the node's share of the time above
            from node.control_client import call

            ops = {"status": [("status", {}), ("balance", {})],  # `status` asks for both
                   "offers search": [("search", {"query": ""})], "rentals": [("rentals", {})]}[name]
            answer = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                for op, kw in ops:
                    call(d, op, **kw)
                answer.append(time.perf_counter() - t0)
            result["commands"][name]["node_answer_p50_s"] = round(pct(answer, 50), 3)
            r = result["commands"][name]
            print(f"{name:>14}: p50 {r['p50_s']} s  p95 {r['p95_s']} s  max {r['max_s']} s "
                  f"(the node's answer alone: p50 {r['node_answer_p50_s']} s)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    result["bytecode_cache"] = "PYTHONDONTWRITEBYTECODE" not in ENV
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=15)
    main(parser.parse_args())
